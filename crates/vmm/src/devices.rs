//! Port-I/O devices of the PVH platform: the 16550 UART on COM1 (vm-superio, interrupt through
//! an irqfd on GSI 4 of the in-kernel IOAPIC/PIC) and the power-off port. Their state saves
//! and restores with the rest of the machine ([`crate::machine`]), so a migrated guest's
//! console continues where it stopped.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Result, VmmError};

/// First I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of COM1 ports.
pub const COM1_LEN: u16 = 8;
/// COM1's interrupt line (GSI of the in-kernel IOAPIC and PIC).
pub const COM1_GSI: u32 = 4;
/// The power-off port: a byte written here stops the VM with that byte as its status
/// (ringvisor's convention; QEMU's `isa-debug-exit` at the same port reports `(v << 1) | 1`).
pub const EXIT_PORT: u16 = 0x501;
/// Most output bytes kept in memory; later output is still echoed but not captured.
pub const MAX_CAPTURE: usize = 64 << 20;
/// The UART's receive FIFO size (vm-superio).
const UART_FIFO: usize = 64;
/// Most line timestamps kept.
const MAX_LINES: usize = 1 << 20;

/// Where the guest's serial output goes besides the in-memory capture.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOutput {
    /// Captured in memory only.
    #[default]
    Capture,
    /// Captured and copied to the VMM's stdout.
    Stdout,
    /// Captured and copied to the VMM's stderr (when stdout carries machine-readable output).
    Stderr,
    /// Captured and appended to a file.
    File(PathBuf),
}

/// What the guest wrote to its console: the bytes, and when (host wall clock, Unix ns) each
/// line ended. Timestamps in Unix time compare across processes on one host, which is how a
/// test measures the output gap across a migration.
#[derive(Debug, Default, Clone)]
pub struct Capture {
    /// The bytes (up to [`MAX_CAPTURE`]).
    pub bytes: Vec<u8>,
    /// For each `\n` in `bytes`, in order: its offset and the Unix time it was written.
    pub line_ends: Vec<(usize, u64)>,
}

impl Capture {
    /// Complete lines with the time each ended.
    pub fn lines(&self) -> Vec<(u64, String)> {
        let mut start = 0;
        let mut out = Vec::with_capacity(self.line_ends.len());
        for &(end, t) in &self.line_ends {
            let s = String::from_utf8_lossy(&self.bytes[start..end]).into_owned();
            out.push((t, s));
            start = end + 1;
        }
        out
    }
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The UART's output: the capture plus an optional echo.
pub struct Sink {
    capture: Arc<Mutex<Capture>>,
    echo: Option<Box<dyn Write + Send>>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        {
            let mut c = self.capture.lock().unwrap_or_else(|p| p.into_inner());
            let now = unix_ns();
            for &b in buf {
                if c.bytes.len() >= MAX_CAPTURE {
                    break;
                }
                if b == b'\n' && c.line_ends.len() < MAX_LINES {
                    let at = c.bytes.len();
                    c.line_ends.push((at, now));
                }
                c.bytes.push(b);
            }
        }
        if let Some(e) = self.echo.as_mut() {
            e.write_all(buf)?;
            e.flush()?;
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
pub struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqLine, NoEvents, Sink>;

/// The saved UART registers and receive FIFO (vm-superio's `SerialState`, made serialisable).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UartState {
    /// DLL, DLM.
    pub divisor: [u8; 2],
    /// IER.
    pub ier: u8,
    /// IIR.
    pub iir: u8,
    /// LCR.
    pub lcr: u8,
    /// LSR.
    pub lsr: u8,
    /// MCR.
    pub mcr: u8,
    /// MSR.
    pub msr: u8,
    /// SCR.
    pub scr: u8,
    /// Received bytes not yet read by the guest.
    pub rx_fifo: Vec<u8>,
}

impl From<&SerialState> for UartState {
    fn from(s: &SerialState) -> Self {
        UartState {
            divisor: [s.baud_divisor_low, s.baud_divisor_high],
            ier: s.interrupt_enable,
            iir: s.interrupt_identification,
            lcr: s.line_control,
            lsr: s.line_status,
            mcr: s.modem_control,
            msr: s.modem_status,
            scr: s.scratch,
            rx_fifo: s.in_buffer.clone(),
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        SerialState {
            baud_divisor_low: s.divisor[0],
            baud_divisor_high: s.divisor[1],
            interrupt_enable: s.ier,
            interrupt_identification: s.iir,
            line_control: s.lcr,
            line_status: s.lsr,
            modem_control: s.mcr,
            modem_status: s.msr,
            scratch: s.scr,
            in_buffer: s.rx_fifo.clone(),
        }
    }
}

/// The platform's port-I/O devices, shared by the vCPU threads.
pub struct Devices {
    uart: Mutex<Option<Uart>>,
    irq: EventFd,
    capture: Arc<Mutex<Capture>>,
    power_off: Mutex<Option<u8>>,
    cv: Condvar,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("power_off", &*self.power_off())
            .finish()
    }
}

/// What a port write asks of the vCPU loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Continue running.
    Continue,
    /// The guest powered off with this status.
    PowerOff(u8),
}

impl Devices {
    /// Builds the devices; `irq` is the eventfd registered as GSI 4's irqfd.
    pub fn new(out: &SerialOutput, irq: EventFd) -> Result<Self> {
        let echo: Option<Box<dyn Write + Send>> = match out {
            SerialOutput::Capture => None,
            SerialOutput::Stdout => Some(Box::new(std::io::stdout())),
            SerialOutput::Stderr => Some(Box::new(std::io::stderr())),
            SerialOutput::File(p) => {
                // An existing file is opened without O_CREAT: a destination's seccomp filter
                // refuses creating files, so its CLI creates the console file up front.
                let open = |create| {
                    std::fs::OpenOptions::new()
                        .create(create)
                        .append(true)
                        .open(p)
                };
                let f = match open(false) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => open(true),
                    r => r,
                }
                .map_err(|e| VmmError::Config(format!("opening {}: {e}", p.display())))?;
                Some(Box::new(f))
            }
        };
        let capture = Arc::new(Mutex::new(Capture::default()));
        let line = irq
            .try_clone()
            .map_err(|e| VmmError::Config(format!("eventfd clone: {e}")))?;
        let uart = Serial::new(
            IrqLine(line),
            Sink {
                capture: capture.clone(),
                echo,
            },
        );
        Ok(Devices {
            uart: Mutex::new(Some(uart)),
            irq,
            capture,
            power_off: Mutex::new(None),
            cv: Condvar::new(),
        })
    }

    fn uart(&self) -> MutexGuard<'_, Option<Uart>> {
        self.uart.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn power_off(&self) -> MutexGuard<'_, Option<u8>> {
        self.power_off.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles an `out` of the vCPU loop.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioAction {
        let v = data.first().copied().unwrap_or(0);
        if port == EXIT_PORT {
            let mut p = self.power_off();
            if p.is_none() {
                *p = Some(v);
            }
            self.cv.notify_all();
            return PioAction::PowerOff(v);
        }
        if (COM1_PORT..COM1_PORT + COM1_LEN).contains(&port) {
            if let Some(u) = self.uart().as_mut() {
                // An interrupt that cannot be signalled is not fatal to the output.
                let _ = u.write((port - COM1_PORT) as u8, v);
            }
        }
        PioAction::Continue
    }

    /// Handles an `in` of the vCPU loop (unclaimed ports read as all ones).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        let v = if (COM1_PORT..COM1_PORT + COM1_LEN).contains(&port) {
            self.uart()
                .as_mut()
                .map(|u| u.read((port - COM1_PORT) as u8))
                .unwrap_or(0xff)
        } else {
            0xff
        };
        data.fill(v);
    }

    /// Queues `bytes` on the UART's receive FIFO; returns how many fit (64-byte FIFO).
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        self.uart()
            .as_mut()
            .and_then(|u| u.enqueue_raw_bytes(bytes).ok())
            .unwrap_or(0)
    }

    /// Writes `bytes` to the console as if the guest had written them (captured and echoed
    /// where its output goes), without touching the UART's registers: a replication standby
    /// replays the output of the last checkpoint it applied before the guest resumes.
    pub fn replay_output(&self, bytes: &[u8]) -> std::io::Result<()> {
        match self.uart().as_mut() {
            Some(u) => u.writer_mut().write_all(bytes),
            None => Ok(()),
        }
    }

    /// The console output so far.
    pub fn capture(&self) -> Capture {
        self.capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The console bytes so far.
    pub fn serial_output(&self) -> Vec<u8> {
        self.capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bytes
            .clone()
    }

    /// Appends the console bytes from offset `from` on to `out` (nothing past the capture
    /// limit); returns the offset after them, where the next call starts.
    pub fn serial_output_since(&self, from: usize, out: &mut Vec<u8>) -> usize {
        let c = self.capture.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(new) = c.bytes.get(from..) {
            out.extend_from_slice(new);
        }
        c.bytes.len().max(from)
    }

    /// How many console bytes the guest wrote so far (without copying them).
    pub fn serial_output_len(&self) -> usize {
        self.capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .bytes
            .len()
    }

    /// The status the guest powered off with, if it did.
    pub fn powered_off(&self) -> Option<u8> {
        *self.power_off()
    }

    /// Waits up to `timeout` for a power-off; returns its status.
    pub fn wait_power_off(&self, timeout: Duration) -> Option<u8> {
        let deadline = Instant::now() + timeout;
        let mut p = self.power_off();
        while p.is_none() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            p = self
                .cv
                .wait_timeout(p, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *p
    }

    /// Wakes [`Devices::wait_power_off`] waiters (used when a vCPU fails).
    pub fn notify(&self) {
        self.cv.notify_all();
    }

    /// The UART's state.
    pub fn save_uart(&self) -> UartState {
        self.uart()
            .as_ref()
            .map(|u| UartState::from(&u.state()))
            .unwrap_or_else(|| UartState::from(&SerialState::default()))
    }

    /// Replaces the UART's state (before the vCPUs run), keeping its output and interrupt.
    pub fn restore_uart(&self, st: &UartState) -> Result<()> {
        if st.rx_fifo.len() > UART_FIFO {
            return Err(VmmError::State(format!(
                "UART state has {} received bytes; the FIFO holds {UART_FIFO}",
                st.rx_fifo.len()
            )));
        }
        let mut g = self.uart();
        let old = g
            .take()
            .ok_or_else(|| VmmError::State("the UART is gone".into()))?;
        let sink = old.into_writer();
        let line = self
            .irq
            .try_clone()
            .map_err(|e| VmmError::Config(format!("eventfd clone: {e}")))?;
        match Serial::from_state(&SerialState::from(st), IrqLine(line), NoEvents, sink) {
            Ok(u) => {
                *g = Some(u);
                Ok(())
            }
            // Unreachable after the FIFO check (vm-superio's only refusal); the UART is then
            // absent (reads as all ones), never a panic.
            Err(e) => Err(VmmError::State(format!("UART state rejected: {e:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Devices {
        Devices::new(
            &SerialOutput::Capture,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn output_is_captured_with_line_times() {
        let d = devices();
        for b in b"hello\nworld\npartial" {
            assert_eq!(d.pio_write(COM1_PORT, &[*b]), PioAction::Continue);
        }
        let c = d.capture();
        let lines = c.lines();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].1, "hello");
        assert_eq!(lines[1].1, "world");
        assert!(lines[0].0 > 0 && lines[0].0 <= lines[1].0);
        assert_eq!(d.serial_output(), b"hello\nworld\npartial");
    }

    #[test]
    fn exit_port_powers_off_once() {
        let d = devices();
        assert_eq!(d.powered_off(), None);
        assert_eq!(d.pio_write(EXIT_PORT, &[7]), PioAction::PowerOff(7));
        assert_eq!(d.pio_write(EXIT_PORT, &[9]), PioAction::PowerOff(9));
        assert_eq!(d.powered_off(), Some(7));
        assert_eq!(d.wait_power_off(Duration::from_millis(1)), Some(7));
    }

    #[test]
    fn uart_state_round_trips_with_rx_fifo_and_output_continues() {
        let d = devices();
        // LCR: 8N1 with DLAB, divisor 3, then DLAB off; IER: receive interrupt on.
        d.pio_write(COM1_PORT + 3, &[0x83]);
        d.pio_write(COM1_PORT, &[3]);
        d.pio_write(COM1_PORT + 1, &[0]);
        d.pio_write(COM1_PORT + 3, &[0x03]);
        d.pio_write(COM1_PORT + 1, &[0x01]);
        assert_eq!(d.serial_input(b"ab"), 2);
        let st = d.save_uart();
        assert_eq!(st.rx_fifo, b"ab");
        assert_eq!(st.divisor, [3, 0]);
        assert_eq!(st.lcr, 0x03);
        let e = devices();
        e.restore_uart(&st).unwrap();
        assert_eq!(e.save_uart(), st);
        let mut b = [0u8];
        e.pio_read(COM1_PORT, &mut b);
        assert_eq!(b[0], b'a');
        e.pio_write(COM1_PORT, b"x");
        assert_eq!(e.serial_output(), b"x");
    }

    #[test]
    fn a_corrupt_uart_state_is_a_typed_error() {
        let d = devices();
        let mut st = d.save_uart();
        st.rx_fifo = vec![0; 1000];
        assert!(matches!(d.restore_uart(&st), Err(VmmError::State(_))));
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let d = devices();
        let mut b = [0u8; 2];
        d.pio_read(0x60, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }
}
