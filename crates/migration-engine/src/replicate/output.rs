//! Output commit: what the guest sends to the outside during an epoch is held on the primary
//! and released only once the checkpoint taken at the end of that epoch has been applied by
//! the standby. After a failover the outside world has therefore seen nothing the standby's
//! guest does not also remember; the resumed guest produces again whatever was held back.

use std::collections::VecDeque;
use std::io::Write;

/// A source of guest output (its serial console today): drained while the guest is paused,
/// so what it returns is exactly what the guest produced before the checkpoint's state.
pub trait GuestOutput: Send {
    /// Appends everything produced since the last call to `out`.
    fn drain(&mut self, out: &mut Vec<u8>);
}

/// The console of a `vmm::Vm` (PVH platform) as guest output: the bytes its UART captured
/// since the last drain. The capture holds at most `vmm::devices::MAX_CAPTURE` bytes; output
/// past it is not seen here.
#[derive(Debug)]
pub struct VmConsole {
    vm: std::sync::Arc<vmm::Vm>,
    at: usize,
}

impl VmConsole {
    /// The console of `vm` from what it wrote so far on (`from_start`: from its first byte).
    pub fn new(vm: std::sync::Arc<vmm::Vm>, from_start: bool) -> Self {
        let at = match (from_start, vm.devices()) {
            (false, Some(d)) => d.serial_output_len(),
            _ => 0,
        };
        VmConsole { vm, at }
    }
}

impl GuestOutput for VmConsole {
    fn drain(&mut self, out: &mut Vec<u8>) {
        if let Some(d) = self.vm.devices() {
            self.at = d.serial_output_since(self.at, out);
        }
    }
}

/// The primary's held output and where each epoch's share ends.
pub struct OutputCommit {
    held: Vec<u8>,
    /// (epoch, end offset in `held`) for each checkpoint not yet applied, oldest first.
    marks: VecDeque<(u64, usize)>,
    sink: Box<dyn Write + Send>,
    released: u64,
}

impl std::fmt::Debug for OutputCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputCommit")
            .field("held", &self.held.len())
            .field("marks", &self.marks)
            .field("released", &self.released)
            .finish()
    }
}

impl OutputCommit {
    /// Output released to `sink`.
    pub fn new(sink: Box<dyn Write + Send>) -> Self {
        OutputCommit {
            held: Vec::new(),
            marks: VecDeque::new(),
            sink,
            released: 0,
        }
    }

    /// At checkpoint `epoch`'s pause: takes what the guest produced since the last
    /// checkpoint and holds it until `epoch` is applied.
    pub fn capture(&mut self, src: &mut dyn GuestOutput, epoch: u64) {
        src.drain(&mut self.held);
        self.marks.push_back((epoch, self.held.len()));
    }

    /// What the last [`OutputCommit::capture`] took (the output of its epoch, held until
    /// that checkpoint is applied): the checkpoint carries it, so a standby that fails over
    /// can show it if the primary died before releasing it.
    pub fn last_captured(&self) -> &[u8] {
        let n = self.marks.len();
        let end = self.marks.back().map_or(0, |m| m.1);
        let start = if n >= 2 { self.marks[n - 2].1 } else { 0 };
        &self.held[start..end]
    }

    /// The standby applied `epoch`: releases the output of every epoch up to it. Output
    /// captured after that checkpoint stays held.
    pub fn release(&mut self, epoch: u64) -> std::io::Result<u64> {
        let mut end = 0;
        while let Some(&(e, off)) = self.marks.front() {
            if e > epoch {
                break;
            }
            end = off;
            self.marks.pop_front();
        }
        self.emit(end)
    }

    /// Replication ended (the standby was lost or replication stopped): the primary is the
    /// only copy again, so what it held is released (after what the guest produced since the
    /// last checkpoint, drained from `src`).
    pub fn release_all(&mut self, src: Option<&mut dyn GuestOutput>) -> std::io::Result<u64> {
        if let Some(s) = src {
            s.drain(&mut self.held);
        }
        self.marks.clear();
        self.emit(self.held.len())
    }

    fn emit(&mut self, end: usize) -> std::io::Result<u64> {
        if end == 0 {
            return Ok(0);
        }
        self.sink.write_all(&self.held[..end])?;
        self.sink.flush()?;
        self.held.drain(..end);
        for m in &mut self.marks {
            m.1 -= end;
        }
        self.released += end as u64;
        Ok(end as u64)
    }

    /// The sink, once replication is over (release what is held first).
    pub fn into_sink(self) -> Box<dyn Write + Send> {
        self.sink
    }

    /// Bytes held now.
    pub fn held_bytes(&self) -> usize {
        self.held.len()
    }

    /// Bytes released so far.
    pub fn released_bytes(&self) -> u64 {
        self.released
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Src(Vec<u8>);
    impl GuestOutput for Src {
        fn drain(&mut self, out: &mut Vec<u8>) {
            out.append(&mut self.0);
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_of_an_epoch_is_released_only_when_its_checkpoint_is_applied() {
        let out = Shared::default();
        let mut c = OutputCommit::new(Box::new(out.clone()));
        let mut src = Src(b"a1 ".to_vec());
        c.capture(&mut src, 1);
        src.0.extend_from_slice(b"b2 ");
        c.capture(&mut src, 2);
        src.0.extend_from_slice(b"c3 ");
        assert_eq!(c.release(0).unwrap(), 0);
        assert!(
            out.0.lock().unwrap().is_empty(),
            "nothing applied, nothing out"
        );
        assert_eq!(c.release(1).unwrap(), 3);
        assert_eq!(&out.0.lock().unwrap()[..], b"a1 ");
        // Produced after checkpoint 2's pause: still held after 2 is applied.
        c.capture(&mut Src(Vec::new()), 3);
        assert_eq!(c.release(2).unwrap(), 3);
        assert_eq!(&out.0.lock().unwrap()[..], b"a1 b2 ");
        assert_eq!(c.held_bytes(), 0);
        c.capture(&mut src, 4);
        assert_eq!(c.held_bytes(), 3);
        assert_eq!(c.release(4).unwrap(), 3);
        assert_eq!(&out.0.lock().unwrap()[..], b"a1 b2 c3 ");
        assert_eq!(c.released_bytes(), 9);
    }

    #[test]
    fn last_captured_is_exactly_the_output_of_the_epoch_just_captured() {
        let out = Shared::default();
        let mut c = OutputCommit::new(Box::new(out.clone()));
        c.capture(&mut Src(b"one ".to_vec()), 1);
        assert_eq!(c.last_captured(), b"one ");
        c.capture(&mut Src(b"two ".to_vec()), 2);
        assert_eq!(c.last_captured(), b"two ");
        c.release(1).unwrap();
        assert_eq!(c.last_captured(), b"two ");
        c.release(2).unwrap();
        c.capture(&mut Src(Vec::new()), 3);
        assert_eq!(c.last_captured(), b"");
        c.capture(&mut Src(b"four".to_vec()), 4);
        assert_eq!(c.last_captured(), b"four");
        assert_eq!(&out.0.lock().unwrap()[..], b"one two ");
    }

    #[test]
    fn release_all_flushes_held_and_pending_output_in_order() {
        let out = Shared::default();
        let mut c = OutputCommit::new(Box::new(out.clone()));
        c.capture(&mut Src(b"x".to_vec()), 1);
        c.release_all(Some(&mut Src(b"y".to_vec()))).unwrap();
        assert_eq!(&out.0.lock().unwrap()[..], b"xy");
        assert_eq!(c.held_bytes(), 0);
    }
}
