//! Helpers shared by the job tests (real KVM) and the engine tests (fake VM).
#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migration::wire::{Ack, AckWriter, Decoder, Message, PageSink};
use migration_engine::{JobEvent, MigrationInfo, MigrationJob, MigrationStatus};

/// Where the scripted destination stops answering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StallAt {
    /// Never answers Hello + Layout.
    Accept,
    /// Never answers the Sync barrier.
    Sync,
    /// Never answers Complete (the source is paused).
    Ready,
    /// Answers Commit only when told to (the test cancels in between).
    Resumed,
}

struct NullSink;
impl PageSink for NullSink {
    fn write_page(&mut self, _: u64, _: &[u8]) {}
    fn zero_page(&mut self, _: u64) {}
}

/// The scripted destination: its address, "reached the stall point", "go on", its thread.
pub type Scripted = (
    String,
    mpsc::Receiver<()>,
    mpsc::Sender<()>,
    std::thread::JoinHandle<Result<Message, migration::wire::WireError>>,
);

/// Recorded events and the callback that records them.
pub type Recorder = (
    Arc<Mutex<Vec<JobEvent>>>,
    Box<dyn Fn(JobEvent) + Send + Sync>,
);

/// A protocol-speaking destination that stalls at `at`: it signals `reached` there, then
/// reads on and returns the next message (an Abort when the source cancels). With
/// [`StallAt::Resumed`] it waits for `go` and then answers Resumed.
pub fn scripted_destination(at: StallAt) -> Scripted {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let (reached_tx, reached) = mpsc::channel();
    let (go, go_rx) = mpsc::channel::<()>();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut acks = AckWriter::new(s.try_clone().unwrap());
        let mut dec = Decoder::new(std::io::BufReader::new(s));
        let mut stalled = false;
        loop {
            let m = dec.recv(&mut NullSink)?;
            if stalled {
                return Ok(m);
            }
            match m {
                Message::Layout(_) if at == StallAt::Accept => stalled = true,
                Message::Layout(_) => acks.send(&Ack::Accepted)?,
                Message::Sync(_) if at == StallAt::Sync => stalled = true,
                Message::Sync(t) => acks.send(&Ack::Synced(t))?,
                Message::Complete(_) if at == StallAt::Ready => stalled = true,
                Message::Complete(_) => acks.send(&Ack::ReadyToResume { digest: None })?,
                Message::Commit => {
                    let _ = reached_tx.send(());
                    let _ = go_rx.recv();
                    acks.send(&Ack::Resumed {
                        unix_ns: migration_engine::unix_ns(),
                    })?;
                    return Ok(Message::Commit);
                }
                _ => {}
            }
            if stalled {
                let _ = reached_tx.send(());
            }
        }
    });
    (addr, reached, go, h)
}

/// Records the job's events.
pub fn recorder() -> Recorder {
    let ev = Arc::new(Mutex::new(Vec::new()));
    let e2 = ev.clone();
    (ev, Box::new(move |e| e2.lock().unwrap().push(e)))
}

pub fn statuses(ev: &Mutex<Vec<JobEvent>>) -> Vec<MigrationStatus> {
    ev.lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            JobEvent::Status(s) => Some(*s),
            _ => None,
        })
        .collect()
}

/// Polls `info()` until `pred` holds (the job is asserted not to have ended first).
pub fn wait_for(
    job: &MigrationJob,
    what: &str,
    pred: impl Fn(&MigrationInfo) -> bool,
) -> MigrationInfo {
    let t = Instant::now();
    loop {
        let i = job.info();
        if pred(&i) {
            return i;
        }
        assert!(!i.status.is_final(), "{what}: the job ended first: {i:?}");
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{what}: never reached: {i:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
