//! Guest-memory access for the model: the [`GuestMem`] trait the model reads and writes its
//! in-memory tables and command queue through, a simple in-crate backend ([`VecMem`]), an
//! adapter for vm-memory's [`vm_memory::GuestMemory`] ([`VmMemory`]), and the write log
//! ([`WriteLog`]) that records every guest page the model dirties so a VMM can merge those
//! pages into its dirty tracking (the model's writes do not go through a vCPU, so KVM's dirty
//! log cannot see them).

use vm_memory::{Bytes, GuestAddress};

use crate::error::MemError;

/// Page granule of the write log.
pub const LOG_PAGE_SIZE: u64 = 4096;

/// Guest-physical memory as the model sees it.
pub trait GuestMem {
    /// Reads `buf.len()` bytes at guest-physical `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Writes `data` at guest-physical `addr`.
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError>;
}

/// A flat RAM region `[base, base + data.len())` held in a `Vec<u8>`; everything else is
/// unbacked. Used by tests, the qtest front end and the benchmark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecMem {
    base: u64,
    data: Vec<u8>,
}

impl VecMem {
    /// A zero-filled region of `size` bytes at `base`.
    pub fn new(base: u64, size: usize) -> Self {
        VecMem {
            base,
            data: vec![0; size],
        }
    }

    /// First guest-physical address of the region.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size of the region in bytes.
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Whether `[addr, addr + len)` lies inside the region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        self.range(addr, len).is_some()
    }

    #[inline]
    fn range(&self, addr: u64, len: u64) -> Option<std::ops::Range<usize>> {
        let start = addr.checked_sub(self.base)?;
        let end = start.checked_add(len)?;
        if end > self.data.len() as u64 {
            return None;
        }
        Some(start as usize..end as usize)
    }
}

impl GuestMem for VecMem {
    #[inline]
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let len = buf.len() as u64;
        let r = self
            .range(addr, len)
            .ok_or(MemError::Unbacked { addr, len })?;
        buf.copy_from_slice(&self.data[r]);
        Ok(())
    }

    #[inline]
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        let len = data.len() as u64;
        let r = self
            .range(addr, len)
            .ok_or(MemError::Unbacked { addr, len })?;
        self.data[r].copy_from_slice(data);
        Ok(())
    }
}

/// Adapter that lets the model use any vm-memory [`vm_memory::GuestMemory`] (for example a
/// clone of the VMM's `GuestMemoryMmap`, which shares the mappings).
#[derive(Debug, Clone)]
pub struct VmMemory<M>(pub M);

impl<M: vm_memory::GuestMemory> GuestMem for VmMemory<M> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.0
            .read_slice(buf, GuestAddress(addr))
            .map_err(|_| MemError::Unbacked {
                addr,
                len: buf.len() as u64,
            })
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.0
            .write_slice(data, GuestAddress(addr))
            .map_err(|_| MemError::Unbacked {
                addr,
                len: data.len() as u64,
            })
    }
}

/// Callback told about every guest-memory write the model makes: `(address, length)`.
pub type WriteHook = Box<dyn FnMut(u64, u64) + Send>;

/// Entries the log holds before it compacts itself (sort + dedup in place).
const COMPACT_AT: usize = 4096;

/// Record of the guest pages the model has written since the last drain.
///
/// Recording a write does not allocate once the log has grown to its working size: pages go
/// into a vector (skipping a repeat of the last page), which is sorted and deduplicated in
/// place when it fills up and when it is drained, so its length stays bounded by twice the
/// number of distinct pages written (or 4096 entries, whichever is larger).
pub struct WriteLog {
    pages: Vec<u64>,
    /// Pages recorded since the last drain, direct-mapped (page + 1; 0 = empty slot).
    recent: [u64; RECENT_SLOTS],
    writes: u64,
    hook: Option<WriteHook>,
}

impl Default for WriteLog {
    fn default() -> Self {
        WriteLog {
            pages: Vec::new(),
            recent: [0; RECENT_SLOTS],
            writes: 0,
            hook: None,
        }
    }
}

impl std::fmt::Debug for WriteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteLog")
            .field("pages", &self.pages.len())
            .field("writes", &self.writes)
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl WriteLog {
    /// Notes a write of `len` bytes at `addr`.
    #[inline]
    pub(crate) fn record(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.writes += 1;
        let first = addr / LOG_PAGE_SIZE;
        let last = addr.saturating_add(len - 1) / LOG_PAGE_SIZE;
        // Almost every write of the model (a pending-table byte, an ITE, a table entry) lies
        // within one page.
        self.note_page(first);
        if last != first {
            (first + 1..=last).for_each(|p| self.note_page(p));
        }
        if let Some(h) = self.hook.as_mut() {
            h(addr, len);
        }
    }

    /// Records page number `p` unless it was recorded since the last drain.
    ///
    /// The model's writes cycle over a few pages (each PE's pending table, the ITS tables): a
    /// page already recorded since the last drain is found in a small direct-mapped set
    /// (holding page + 1 so that 0 means empty) and not pushed again. The slot is a
    /// multiplicative (Fibonacci) hash of the page number: the pending tables of consecutive
    /// PEs lie a fixed stride apart (64 KiB in `bench gic`), which a plain `page mod slots`
    /// folds onto the same slots.
    #[inline]
    fn note_page(&mut self, p: u64) {
        let page = p * LOG_PAGE_SIZE;
        let slot = recent_slot(p);
        if self.recent[slot] != page.wrapping_add(1) {
            self.push_page(slot, page);
        }
    }

    #[cold]
    fn push_page(&mut self, slot: usize, page: u64) {
        if self.pages.len() >= COMPACT_AT.max(self.pages.capacity()) {
            self.compact();
        }
        self.pages.push(page);
        self.recent[slot] = page.wrapping_add(1);
    }

    fn compact(&mut self) {
        self.pages.sort_unstable();
        self.pages.dedup();
        // Keep at least half the capacity free so compaction stays amortized O(1) per write.
        let want = self.pages.len() * 2;
        if self.pages.capacity() < want {
            self.pages.reserve(want - self.pages.len());
        }
    }

    /// Moves the page-aligned addresses of every page written since the last drain into
    /// `out` (appending, ascending, each page once) and forgets them.
    pub fn drain_pages_into(&mut self, out: &mut Vec<u64>) {
        self.pages.sort_unstable();
        self.pages.dedup();
        out.extend_from_slice(&self.pages);
        self.pages.clear();
        self.recent = [0; RECENT_SLOTS];
    }

    /// Number of distinct pages currently recorded.
    pub fn pending_pages(&mut self) -> usize {
        self.pages.sort_unstable();
        self.pages.dedup();
        self.pages.len()
    }

    /// Total number of writes ever recorded.
    pub fn total_writes(&self) -> u64 {
        self.writes
    }

    /// Installs (or removes) a callback run on every write.
    pub fn set_hook(&mut self, hook: Option<WriteHook>) {
        self.hook = hook;
    }
}

/// Slots of the recently-recorded page set (a power of two).
const RECENT_SLOTS: usize = 64;

/// Slot of page number `p` in the recently-recorded page set: the top bits of `p` times
/// 2^64 / golden ratio, which spreads strided page numbers over all slots.
fn recent_slot(p: u64) -> usize {
    const BITS: u32 = RECENT_SLOTS.trailing_zeros();
    (p.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - BITS)) as usize
}

/// Guest memory plus the write log: the only path by which the model touches guest memory.
#[derive(Debug)]
pub(crate) struct LoggedMem<M> {
    pub(crate) mem: M,
    pub(crate) log: WriteLog,
}

impl<M: GuestMem> LoggedMem<M> {
    #[inline]
    pub(crate) fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemError> {
        self.mem.read(addr, buf)
    }

    #[inline]
    pub(crate) fn read_u64(&self, addr: u64) -> Result<u64, MemError> {
        let mut b = [0u8; 8];
        self.mem.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    #[inline]
    pub(crate) fn read_u8(&self, addr: u64) -> Result<u8, MemError> {
        let mut b = [0u8; 1];
        self.mem.read(addr, &mut b)?;
        Ok(b[0])
    }

    #[inline]
    pub(crate) fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), MemError> {
        self.mem.write(addr, data)?;
        self.log.record(addr, data.len() as u64);
        Ok(())
    }

    #[inline]
    pub(crate) fn write_u64(&mut self, addr: u64, v: u64) -> Result<(), MemError> {
        self.write(addr, &v.to_le_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vecmem_rejects_accesses_outside_its_region() {
        let mut m = VecMem::new(0x1000, 0x100);
        assert!(m.write(0x10FF, &[1]).is_ok());
        assert_eq!(
            m.write(0x10FF, &[1, 2]),
            Err(MemError::Unbacked {
                addr: 0x10FF,
                len: 2
            })
        );
        let mut b = [0u8; 1];
        assert!(m.read(0xFFF, &mut b).is_err());
        assert!(m.read(u64::MAX, &mut b).is_err());
        m.read(0x10FF, &mut b).unwrap();
        assert_eq!(b, [1]);
    }

    #[test]
    fn write_log_records_every_page_a_write_touches() {
        let mut log = WriteLog::default();
        log.record(0x1FFF, 2);
        log.record(0x5000, 1);
        log.record(0x5001, 0);
        log.record(0x1000, 1);
        assert_eq!(log.pending_pages(), 3);
        let mut out = Vec::new();
        log.drain_pages_into(&mut out);
        assert_eq!(out, vec![0x1000, 0x2000, 0x5000]);
        assert_eq!(log.total_writes(), 3);
        assert_eq!(log.pending_pages(), 0);
    }

    #[test]
    fn write_log_records_strided_pages_once_each() {
        // The pending tables of four PEs, 64 KiB apart (`bench gic`'s layout), written in
        // turn: each page is pushed once, not once per write (a `page mod slots` set folds
        // these strides onto shared slots and evicts them from each other).
        let mut log = WriteLog::default();
        for i in 0..10_000u64 {
            log.record(0x4001_0400 + (i % 4) * 0x1_0000, 1);
        }
        assert_eq!(log.pages.len(), 4, "each page recorded once");
        assert_eq!(log.total_writes(), 10_000);
        let mut out = Vec::new();
        log.drain_pages_into(&mut out);
        assert_eq!(
            out,
            vec![0x4001_0000, 0x4002_0000, 0x4003_0000, 0x4004_0000]
        );
    }

    #[test]
    fn write_log_stays_bounded_by_distinct_pages() {
        let mut log = WriteLog::default();
        for i in 0..100_000u64 {
            log.record((i % 3) * LOG_PAGE_SIZE, 1);
        }
        assert!(
            log.pages.len() <= COMPACT_AT,
            "compacted: {}",
            log.pages.len()
        );
        let mut out = Vec::new();
        log.drain_pages_into(&mut out);
        assert_eq!(out, vec![0, LOG_PAGE_SIZE, 2 * LOG_PAGE_SIZE]);
    }
}
