//! A tiny QMP server for trying clients by hand (QEMU's `qmp-shell`, `qemu.qmp`, socat).
//!
//! ```sh
//! cargo run -p qmp --example qmp_echo_server -- /tmp/qmp.sock
//! python3 -m qemu.qmp.qmp_shell /tmp/qmp.sock     # then: echo a=1 / emit name=HELLO
//! ```
//!
//! Commands: `echo` returns its arguments; `emit` (`name`, optional `data` object) sends an
//! event to every client. It also emits `HEARTBEAT` every 10 s. Stops when stdin closes.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use qmp::{Args, ClientCtx, CommandError, Handler, QmpServer, ServerConfig};
use serde_json::{json, Map, Value};

struct Echo;

impl Handler for Echo {
    fn commands(&self) -> Vec<String> {
        vec!["echo".into(), "emit".into()]
    }

    fn execute(
        &self,
        name: &str,
        args: Map<String, Value>,
        ctx: &ClientCtx,
    ) -> Result<Value, CommandError> {
        match name {
            "echo" => Ok(Value::Object(args)),
            "emit" => {
                let a = Args::new(args);
                let event = a.required_str("name")?;
                let data = a.optional_object("data")?.cloned();
                a.deny_unknown(&["name", "data"])?;
                let clients = ctx.events().emit(event, data);
                Ok(json!({ "clients": clients }))
            }
            _ => Err(CommandError::command_not_found(name)),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: qmp_echo_server SOCKET")?;
    let server = QmpServer::bind(&path, Arc::new(Echo), ServerConfig::default())?;
    println!("listening {path}");
    let events = server.events();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(10));
        events.emit("HEARTBEAT", None);
    });
    // Runs until stdin closes (Ctrl-D, or the parent process ends).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(server);
    Ok(())
}
