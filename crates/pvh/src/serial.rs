//! The 16550 UART at I/O port 0x3f8 (vm-superio), its interrupt line (an irqfd on GSI 4 of the
//! in-kernel IOAPIC/PIC) and where its output goes.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{PvhError, Result};

/// First I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of COM1 ports.
pub const COM1_LEN: u16 = 8;
/// COM1's interrupt line.
pub const COM1_GSI: u32 = 4;
/// Most output bytes kept in memory; the rest is counted but dropped from the buffer.
pub const MAX_CAPTURE: usize = 64 << 20;

/// Where the guest's serial output goes besides the in-memory capture.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOutput {
    /// Captured in memory only (see `PvhVm::serial_output`).
    #[default]
    Capture,
    /// Captured and copied to the VMM's stdout.
    Stdout,
    /// Captured and appended to a file.
    File(PathBuf),
}

/// The UART's output sink: an in-memory capture plus an optional echo.
pub(crate) struct Sink {
    capture: Arc<Mutex<Vec<u8>>>,
    echo: Option<Box<dyn Write + Send>>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            let mut c = self.capture.lock().unwrap_or_else(|p| p.into_inner());
            let room = MAX_CAPTURE.saturating_sub(c.len());
            c.extend_from_slice(&buf[..buf.len().min(room)]);
        }
        if let Some(e) = self.echo.as_mut() {
            e.write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.echo.as_mut() {
            Some(e) => e.flush(),
            None => Ok(()),
        }
    }
}

/// The UART's interrupt: writing the eventfd injects GSI 4 through KVM's irqfd.
pub(crate) struct IrqLine(pub(crate) EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The UART model.
pub(crate) type Uart = Serial<IrqLine, NoEvents, Sink>;

/// Builds the UART and returns it with its capture buffer.
pub(crate) fn build(out: &SerialOutput, irq: EventFd) -> Result<(Uart, Arc<Mutex<Vec<u8>>>)> {
    let capture = Arc::new(Mutex::new(Vec::new()));
    let echo: Option<Box<dyn Write + Send>> = match out {
        SerialOutput::Capture => None,
        SerialOutput::Stdout => Some(Box::new(std::io::stdout())),
        SerialOutput::File(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| PvhError::Host(format!("opening {}: {e}", p.display())))?,
        )),
    };
    let sink = Sink {
        capture: capture.clone(),
        echo,
    };
    Ok((Serial::new(IrqLine(irq), sink), capture))
}
