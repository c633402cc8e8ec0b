//! Redistributors (GICR_* RD_base and SGI_base frames), one per PE: SGI/PPI state, the LPI
//! enable, the property/pending table bases, the LPI configuration cache and the LPI pending
//! state.
//!
//! LPI pending state is written through to the pending table in guest memory on every change
//! (and recorded in the write log), and mirrored in an in-model set that is authoritative while
//! GICR_CTLR.EnableLPIs is 1. LPI configuration (enable, priority) is read from the property
//! table only when LPIs are enabled and when software invalidates (INV, INVALL, GICR_INVLPIR,
//! GICR_INVALLR): software that edits the property table without invalidating does not see
//! its change, as on hardware that caches configuration.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::access::{half64, merge_part, only32, read_bytes, read_part, set_or_clear, write_bytes};
use crate::error::{MemError, MmioError, StateError};
use crate::mem::{GuestMem, LoggedMem};
use crate::regs::*;

/// Saved state of one redistributor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedistState {
    /// GICR_CTLR.EnableLPIs.
    pub enable_lpis: bool,
    /// GICR_WAKER.ProcessorSleep.
    pub processor_sleep: bool,
    /// GICR_PROPBASER.
    pub propbaser: u64,
    /// GICR_PENDBASER.
    pub pendbaser: u64,
    /// GICR_IGROUPR0.
    pub group: u32,
    /// GICR_ISENABLER0.
    pub enable: u32,
    /// SGI/PPI pending latches.
    pub pending: u32,
    /// PPI input line levels.
    #[serde(default)]
    pub line: u32,
    /// SGI/PPI active bits.
    pub active: u32,
    /// GICR_ICFGR1 (PPI configuration).
    pub icfgr1: u32,
    /// GICR_IPRIORITYR bytes for INTIDs 0..31.
    pub priority: Vec<u8>,
    /// Cached LPI configuration: `(INTID, config byte)` for every non-zero cached byte.
    pub lpi_config: Vec<(u32, u8)>,
    /// Pending LPIs.
    pub lpi_pending: Vec<u32>,
}

/// `(priority, INTID)` keys in order: a sorted vector while small (no allocation per change
/// once its capacity is reached: the common case of a few pending LPIs), a B-tree past
/// [`ReadySet::SMALL`] entries (an LPI storm stays O(log n) per change).
#[derive(Debug, Clone)]
pub(crate) enum ReadySet {
    Small(Vec<(u8, u32)>),
    Large(BTreeSet<(u8, u32)>),
}

impl Default for ReadySet {
    fn default() -> Self {
        ReadySet::Small(Vec::new())
    }
}

impl ReadySet {
    const SMALL: usize = 64;

    #[inline]
    pub(crate) fn insert(&mut self, k: (u8, u32)) {
        match self {
            ReadySet::Small(v) => {
                if let Err(i) = v.binary_search(&k) {
                    if v.len() < Self::SMALL {
                        v.insert(i, k);
                    } else {
                        self.grow(k);
                    }
                }
            }
            ReadySet::Large(b) => {
                b.insert(k);
            }
        }
    }

    /// Switches a full vector to a B-tree holding its keys and `k`.
    #[cold]
    fn grow(&mut self, k: (u8, u32)) {
        if let ReadySet::Small(v) = self {
            let mut b: BTreeSet<(u8, u32)> = v.drain(..).collect();
            b.insert(k);
            *self = ReadySet::Large(b);
        }
    }

    #[inline]
    pub(crate) fn remove(&mut self, k: (u8, u32)) {
        match self {
            ReadySet::Small(v) => {
                if let Ok(i) = v.binary_search(&k) {
                    // Usually the only or the last key: no move of the rest.
                    if i + 1 == v.len() {
                        v.pop();
                    } else {
                        v.remove(i);
                    }
                }
            }
            ReadySet::Large(b) => {
                b.remove(&k);
                if b.len() < Self::SMALL / 4 {
                    self.shrink();
                }
            }
        }
    }

    /// Switches a B-tree that has become small back to a sorted vector.
    #[cold]
    fn shrink(&mut self) {
        if let ReadySet::Large(b) = self {
            let v: Vec<(u8, u32)> = b.iter().copied().collect();
            *self = ReadySet::Small(v);
        }
    }

    #[inline]
    pub(crate) fn first(&self) -> Option<(u8, u32)> {
        match self {
            ReadySet::Small(v) => v.first().copied(),
            ReadySet::Large(b) => b.first().copied(),
        }
    }

    pub(crate) fn clear(&mut self) {
        match self {
            ReadySet::Small(v) => v.clear(),
            ReadySet::Large(_) => *self = ReadySet::Small(Vec::new()),
        }
    }
}

/// A set of LPI INTIDs as a bitmap (grown on demand up to the highest INTID inserted): the
/// pending set changes on every MSI and acknowledge, and a bitmap does that without
/// allocating.
#[derive(Debug, Clone, Default)]
pub(crate) struct LpiSet {
    words: Vec<u64>,
    len: usize,
}

impl LpiSet {
    pub(crate) fn contains(&self, intid: u32) -> bool {
        self.words
            .get((intid / 64) as usize)
            .is_some_and(|w| w & (1 << (intid % 64)) != 0)
    }

    /// Adds `intid`; returns whether it was absent.
    pub(crate) fn insert(&mut self, intid: u32) -> bool {
        let i = (intid / 64) as usize;
        if i >= self.words.len() {
            self.words.resize(i + 1, 0);
        }
        let m = 1u64 << (intid % 64);
        let new = self.words[i] & m == 0;
        self.words[i] |= m;
        self.len += new as usize;
        new
    }

    /// Removes `intid`; returns whether it was present.
    pub(crate) fn remove(&mut self, intid: u32) -> bool {
        let m = 1u64 << (intid % 64);
        match self.words.get_mut((intid / 64) as usize) {
            Some(w) if *w & m != 0 => {
                *w &= !m;
                self.len -= 1;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.words.clear();
        self.len = 0;
    }

    /// The INTIDs, ascending.
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = bits.trailing_zeros();
                    bits &= bits - 1;
                    i as u32 * 64 + b
                })
            })
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Redistributor {
    pub(crate) enable_lpis: bool,
    pub(crate) processor_sleep: bool,
    pub(crate) propbaser: u64,
    pub(crate) pendbaser: u64,
    pub(crate) group: u32,
    pub(crate) enable: u32,
    /// Pending latches (SGIs, edge events, GICR_ISPENDR0 writes).
    pub(crate) pending: u32,
    /// PPI input line levels.
    pub(crate) line: u32,
    pub(crate) active: u32,
    pub(crate) icfgr1: u32,
    pub(crate) priority: [u8; 32],
    /// LPI configuration cache, indexed by INTID - 8192; empty while LPIs are disabled.
    pub(crate) lpi_cfg: Vec<u8>,
    pub(crate) lpi_pending: LpiSet,
    /// Running summary: `(priority, INTID)` of every pending LPI whose cached configuration
    /// is enabled, so the highest priority one is the first element.
    lpi_ready: ReadySet,
    /// Edge-triggered private INTIDs (SGIs always; PPIs from GICR_ICFGR1).
    edge: u32,
    /// Something a PE's highest priority pending interrupt depends on changed since the GIC
    /// last looked (cleared by the GIC when it recomputes this PE).
    pub(crate) touched: bool,
    typer: u64,
    max_lpi_bits: u8,
}

impl Redistributor {
    pub(crate) fn new(index: usize, affinity: u32, last: bool, max_lpi_bits: u8) -> Self {
        let typer = GICR_TYPER_PLPIS
            | GICR_TYPER_DIRECTLPI
            | if last { GICR_TYPER_LAST } else { 0 }
            | ((index as u64 & 0xFFFF) << GICR_TYPER_PROCNUM_SHIFT)
            | ((affinity as u64) << GICR_TYPER_AFF_SHIFT);
        Redistributor {
            enable_lpis: false,
            processor_sleep: true,
            propbaser: 0,
            pendbaser: 0,
            group: 0,
            enable: 0,
            pending: 0,
            line: 0,
            active: 0,
            icfgr1: 0,
            priority: [0; 32],
            lpi_cfg: Vec::new(),
            lpi_pending: LpiSet::default(),
            lpi_ready: ReadySet::default(),
            edge: 0xFFFF,
            touched: true,
            typer,
            max_lpi_bits,
        }
    }

    /// ORs feature bits (GICv4.1) into GICR_TYPER.
    pub(crate) fn add_typer_bits(&mut self, bits: u64) {
        self.typer |= bits;
    }

    /// 1 for every edge-triggered private INTID (SGIs always; PPIs per GICR_ICFGR1).
    fn edge_mask(&self) -> u32 {
        self.edge
    }

    fn set_icfgr1(&mut self, v: u32) {
        self.icfgr1 = v & 0xAAAA_AAAA;
        self.edge = 0xFFFF | ((crate::dist::edge_bits(self.icfgr1) as u32) << 16);
    }

    /// The summary key of a pending LPI: present iff its cached configuration enables it.
    fn ready_key(&self, intid: u32) -> Option<(u8, u32)> {
        let c = self.lpi_config(intid);
        (c & LPI_PROP_ENABLE != 0).then_some((c & LPI_PROP_PRIORITY_MASK & PRIORITY_MASK, intid))
    }

    /// Rebuilds the pending-and-enabled summary from the pending set and the cache.
    fn rebuild_ready(&mut self) {
        self.touched = true;
        let mut ready = std::mem::take(&mut self.lpi_ready);
        ready.clear();
        for k in self.lpi_pending.iter().filter_map(|i| self.ready_key(i)) {
            ready.insert(k);
        }
        self.lpi_ready = ready;
    }

    /// Highest priority pending and enabled LPI (lowest INTID among equals).
    pub(crate) fn best_lpi(&self) -> Option<(u8, u32)> {
        self.lpi_ready.first()
    }

    /// SGI/PPI pending state: the latch, plus the line of level-sensitive PPIs.
    pub(crate) fn pending_word(&self) -> u32 {
        self.pending | (self.line & !self.edge_mask())
    }

    /// Drives a PPI's input line; a rising edge of an edge-triggered PPI sets its latch.
    pub(crate) fn set_ppi_line(&mut self, intid: u32, high: bool) {
        if !(NUM_SGIS..NUM_PRIVATE).contains(&intid) {
            return;
        }
        let m = 1u32 << intid;
        self.touched = true;
        if high && self.line & m == 0 && self.edge_mask() & m != 0 {
            self.pending |= m;
        }
        if high {
            self.line |= m;
        } else {
            self.line &= !m;
        }
    }

    /// Number of INTID bits the LPI tables cover: the smaller of PROPBASER.IDbits + 1 and
    /// the GIC's own limit. Fewer than 14 bits means no LPI is in range.
    pub(crate) fn lpi_id_bits(&self) -> u8 {
        let prop = (self.propbaser & GICR_PROPBASER_IDBITS_MASK) as u8 + 1;
        prop.min(self.max_lpi_bits)
    }

    /// One past the largest LPI INTID in range, or `LPI_BASE` if none is.
    pub(crate) fn lpi_end(&self) -> u32 {
        let bits = self.lpi_id_bits();
        if bits < 14 {
            LPI_BASE
        } else {
            1u32 << bits
        }
    }

    fn prop_base(&self) -> u64 {
        self.propbaser & GICR_PROPBASER_PA_MASK
    }

    fn pend_base(&self) -> u64 {
        self.pendbaser & GICR_PENDBASER_PA_MASK
    }

    /// The cached configuration byte of an LPI (0 = disabled when not cached).
    pub(crate) fn lpi_config(&self, intid: u32) -> u8 {
        intid
            .checked_sub(LPI_BASE)
            .and_then(|i| self.lpi_cfg.get(i as usize))
            .copied()
            .unwrap_or(0)
    }

    /// Reloads the whole LPI configuration cache from the property table. A table that is
    /// not backed by guest memory reads as all-disabled.
    pub(crate) fn invalidate_all<M: GuestMem>(&mut self, mem: &LoggedMem<M>) {
        if !self.enable_lpis {
            return;
        }
        let n = (self.lpi_end() - LPI_BASE) as usize;
        self.lpi_cfg.clear();
        self.lpi_cfg.resize(n, 0);
        if mem.read(self.prop_base(), &mut self.lpi_cfg).is_err() {
            self.lpi_cfg.iter_mut().for_each(|b| *b = 0);
        }
        self.rebuild_ready();
    }

    /// Reloads one LPI's configuration byte.
    pub(crate) fn invalidate_one<M: GuestMem>(&mut self, mem: &LoggedMem<M>, intid: u32) {
        if !self.enable_lpis {
            return;
        }
        let Some(idx) = intid.checked_sub(LPI_BASE) else {
            return;
        };
        let addr = self.prop_base() + idx as u64;
        let old = self.ready_key(intid);
        if let Some(slot) = self.lpi_cfg.get_mut(idx as usize) {
            *slot = mem.read_u8(addr).unwrap_or(0);
        }
        if self.lpi_pending.contains(intid) {
            if let Some(k) = old {
                self.lpi_ready.remove(k);
            }
            if let Some(k) = self.ready_key(intid) {
                self.lpi_ready.insert(k);
            }
        }
        self.touched = true;
    }

    /// Whether this redistributor would take LPI `intid` now (EnableLPIs = 1, in range).
    pub(crate) fn accepts_lpi(&self, intid: u32) -> bool {
        self.enable_lpis && self.lpi_in_range(intid)
    }

    /// Whether an LPI INTID is in range for this redistributor's tables.
    pub(crate) fn lpi_in_range(&self, intid: u32) -> bool {
        (LPI_BASE..self.lpi_end()).contains(&intid)
    }

    /// Sets or clears an LPI's pending state, writing the pending table. Returns whether the
    /// redistributor accepted the change (LPIs enabled and INTID in range); LPIs sent to a
    /// redistributor with EnableLPIs = 0 or out of range are dropped.
    pub(crate) fn set_lpi_pending<M: GuestMem>(
        &mut self,
        mem: &mut LoggedMem<M>,
        intid: u32,
        pending: bool,
    ) -> Result<bool, MemError> {
        if !self.enable_lpis || !self.lpi_in_range(intid) {
            return Ok(false);
        }
        let addr = self.pend_base() + (intid / 8) as u64;
        let mut b = mem.read_u8(addr)?;
        let m = 1u8 << (intid % 8);
        let nb = if pending { b | m } else { b & !m };
        if nb != b {
            b = nb;
            mem.write(addr, &[b])?;
        }
        let key = self.ready_key(intid);
        if pending {
            self.lpi_pending.insert(intid);
            if let Some(k) = key {
                self.lpi_ready.insert(k);
            }
        } else {
            self.lpi_pending.remove(intid);
            if let Some(k) = key {
                self.lpi_ready.remove(k);
            }
        }
        self.touched = true;
        Ok(true)
    }

    /// EnableLPIs 0 -> 1: load the configuration cache and the pending table.
    fn enable_lpis_now<M: GuestMem>(&mut self, mem: &LoggedMem<M>, ptz: bool) {
        self.enable_lpis = true;
        self.invalidate_all(mem);
        self.lpi_pending.clear();
        self.lpi_ready.clear();
        if ptz {
            return;
        }
        let end = self.lpi_end();
        let first_byte = (LPI_BASE / 8) as u64;
        let bytes = (end / 8) as u64 - first_byte;
        let mut buf = vec![0u8; bytes as usize];
        if mem.read(self.pend_base() + first_byte, &mut buf).is_err() {
            return;
        }
        for (i, b) in buf.iter().enumerate() {
            if *b == 0 {
                continue;
            }
            for bitn in 0..8 {
                if b & (1 << bitn) != 0 {
                    self.lpi_pending
                        .insert(((first_byte as u32 + i as u32) * 8) + bitn);
                }
            }
        }
        self.rebuild_ready();
    }

    pub(crate) fn read_rd(&self, offset: u64, width: u8) -> Result<u64, MmioError> {
        match offset {
            GICR_CTLR => {
                only32(offset, width)?;
                let en = if self.enable_lpis {
                    GICR_CTLR_ENABLE_LPIS
                } else {
                    0
                };
                Ok((en | GICR_CTLR_CES) as u64)
            }
            GICR_IIDR => {
                only32(offset, width)?;
                Ok(IIDR_VALUE as u64)
            }
            o if (GICR_TYPER..GICR_TYPER + 8).contains(&o) => {
                let pos = half64(GICR_TYPER, o, width)?;
                Ok(read_part(self.typer, pos, width))
            }
            GICR_WAKER => {
                only32(offset, width)?;
                Ok(if self.processor_sleep {
                    (GICR_WAKER_PROCESSOR_SLEEP | GICR_WAKER_CHILDREN_ASLEEP) as u64
                } else {
                    0
                })
            }
            o if (GICR_PROPBASER..GICR_PROPBASER + 8).contains(&o) => {
                let pos = half64(GICR_PROPBASER, o, width)?;
                Ok(read_part(self.propbaser, pos, width))
            }
            o if (GICR_PENDBASER..GICR_PENDBASER + 8).contains(&o) => {
                let pos = half64(GICR_PENDBASER, o, width)?;
                // PTZ is write-only: kept for the next enable, read as zero.
                let v = self.pendbaser & !GICR_PENDBASER_PTZ;
                Ok(read_part(v, pos, width))
            }
            o if [GICR_SETLPIR, GICR_CLRLPIR, GICR_INVLPIR, GICR_INVALLR]
                .iter()
                .any(|r| (*r..*r + 8).contains(&o)) =>
            {
                // Write-only registers read as zero.
                let reg = o & !7;
                half64(reg, o, width)?;
                Ok(0)
            }
            GICR_SYNCR => {
                only32(offset, width)?;
                Ok(0)
            }
            o if id_register(o).is_some() => {
                only32(offset, width)?;
                Ok(id_register(o).unwrap_or(0) as u64)
            }
            _ => Ok(0),
        }
    }

    /// Handles an RD_base write. LPI side effects that need memory are applied here.
    pub(crate) fn write_rd<M: GuestMem>(
        &mut self,
        mem: &mut LoggedMem<M>,
        offset: u64,
        width: u8,
        value: u64,
    ) -> Result<(), MmioError> {
        self.touched = true;
        match offset {
            GICR_CTLR => {
                only32(offset, width)?;
                let want = value as u32 & GICR_CTLR_ENABLE_LPIS != 0;
                if want && !self.enable_lpis {
                    let ptz = self.pendbaser & GICR_PENDBASER_PTZ != 0;
                    self.enable_lpis_now(mem, ptz);
                    // PTZ is a one-shot hint consumed by enabling.
                    self.pendbaser &= !GICR_PENDBASER_PTZ;
                } else if !want && self.enable_lpis {
                    // IMPDEF: EnableLPIs may be cleared. Pending state is already in memory.
                    self.enable_lpis = false;
                    self.lpi_cfg.clear();
                    self.lpi_pending.clear();
                    self.lpi_ready.clear();
                }
                Ok(())
            }
            GICR_WAKER => {
                only32(offset, width)?;
                self.processor_sleep = value as u32 & GICR_WAKER_PROCESSOR_SLEEP != 0;
                Ok(())
            }
            o if (GICR_PROPBASER..GICR_PROPBASER + 8).contains(&o) => {
                let pos = half64(GICR_PROPBASER, o, width)?;
                // UNPREDICTABLE while EnableLPIs = 1: the model ignores the write.
                if !self.enable_lpis {
                    self.propbaser =
                        merge_part(self.propbaser, value, pos, width) & GICR_PROPBASER_MASK;
                }
                Ok(())
            }
            o if (GICR_PENDBASER..GICR_PENDBASER + 8).contains(&o) => {
                let pos = half64(GICR_PENDBASER, o, width)?;
                if !self.enable_lpis {
                    self.pendbaser = merge_part(self.pendbaser, value, pos, width)
                        & (GICR_PENDBASER_MASK | GICR_PENDBASER_PTZ);
                }
                Ok(())
            }
            o if (GICR_SETLPIR..GICR_SETLPIR + 8).contains(&o) => {
                let pos = half64(GICR_SETLPIR, o, width)?;
                if pos == 0 {
                    // A table that is not backed drops the request (nothing to report to).
                    let _ = self.set_lpi_pending(mem, value as u32, true);
                }
                Ok(())
            }
            o if (GICR_CLRLPIR..GICR_CLRLPIR + 8).contains(&o) => {
                let pos = half64(GICR_CLRLPIR, o, width)?;
                if pos == 0 {
                    let _ = self.set_lpi_pending(mem, value as u32, false);
                }
                Ok(())
            }
            o if (GICR_INVLPIR..GICR_INVLPIR + 8).contains(&o) => {
                let pos = half64(GICR_INVLPIR, o, width)?;
                // V = 1 names a vPE (GICv4.1); not implemented, so ignored.
                if pos == 0 && (width == 4 || value & GICR_INV_V == 0) {
                    self.invalidate_one(mem, (value & GICR_INVLPIR_INTID_MASK) as u32);
                }
                Ok(())
            }
            o if (GICR_INVALLR..GICR_INVALLR + 8).contains(&o) => {
                let pos = half64(GICR_INVALLR, o, width)?;
                if pos == 0 && (width == 4 || value & GICR_INV_V == 0) {
                    self.invalidate_all(mem);
                }
                Ok(())
            }
            o if (GICR_TYPER..GICR_TYPER + 8).contains(&o) => {
                half64(GICR_TYPER, o, width)?;
                Ok(())
            }
            o if o == GICR_IIDR || o == GICR_SYNCR || id_register(o).is_some() => {
                only32(offset, width)
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn read_sgi(&self, offset: u64, width: u8) -> Result<u64, MmioError> {
        match offset {
            GICR_IGROUPR0 => only32(offset, width).map(|_| self.group as u64),
            GICR_ISENABLER0 | GICR_ICENABLER0 => only32(offset, width).map(|_| self.enable as u64),
            GICR_ISPENDR0 | GICR_ICPENDR0 => {
                only32(offset, width).map(|_| self.pending_word() as u64)
            }
            GICR_ISACTIVER0 | GICR_ICACTIVER0 => only32(offset, width).map(|_| self.active as u64),
            o if (GICR_IPRIORITYR..GICR_IPRIORITYR + 32).contains(&o) => {
                if width != 1 && width != 4 {
                    return Err(MmioError::WidthNotPermitted { offset, width });
                }
                Ok(read_bytes(
                    &self.priority,
                    (o - GICR_IPRIORITYR) as usize,
                    width,
                ))
            }
            GICR_ICFGR0 => only32(offset, width).map(|_| GICR_ICFGR0_VALUE as u64),
            GICR_ICFGR1 => only32(offset, width).map(|_| self.icfgr1 as u64),
            _ => Ok(0),
        }
    }

    pub(crate) fn write_sgi(
        &mut self,
        offset: u64,
        width: u8,
        value: u64,
    ) -> Result<(), MmioError> {
        let v = value as u32;
        self.touched = true;
        match offset {
            GICR_IGROUPR0 => only32(offset, width).map(|_| self.group = v),
            GICR_ISENABLER0 => {
                only32(offset, width).map(|_| set_or_clear(&mut self.enable, v, true))
            }
            GICR_ICENABLER0 => {
                only32(offset, width).map(|_| set_or_clear(&mut self.enable, v, false))
            }
            GICR_ISPENDR0 => {
                only32(offset, width).map(|_| set_or_clear(&mut self.pending, v, true))
            }
            GICR_ICPENDR0 => {
                only32(offset, width).map(|_| set_or_clear(&mut self.pending, v, false))
            }
            GICR_ISACTIVER0 => {
                only32(offset, width).map(|_| set_or_clear(&mut self.active, v, true))
            }
            GICR_ICACTIVER0 => {
                only32(offset, width).map(|_| set_or_clear(&mut self.active, v, false))
            }
            o if (GICR_IPRIORITYR..GICR_IPRIORITYR + 32).contains(&o) => {
                if width != 1 && width != 4 {
                    return Err(MmioError::WidthNotPermitted { offset, width });
                }
                let start = (o - GICR_IPRIORITYR) as usize;
                write_bytes(&mut self.priority, start, width, value, PRIORITY_MASK);
                Ok(())
            }
            GICR_ICFGR1 => only32(offset, width).map(|_| self.set_icfgr1(v)),
            _ => {
                if width == 4 || width == 1 {
                    Ok(())
                } else {
                    only32(offset, width)
                }
            }
        }
    }

    pub(crate) fn state(&self) -> RedistState {
        RedistState {
            enable_lpis: self.enable_lpis,
            processor_sleep: self.processor_sleep,
            propbaser: self.propbaser,
            pendbaser: self.pendbaser,
            group: self.group,
            enable: self.enable,
            pending: self.pending,
            line: self.line,
            active: self.active,
            icfgr1: self.icfgr1,
            priority: self.priority.to_vec(),
            lpi_config: self
                .lpi_cfg
                .iter()
                .enumerate()
                .filter(|(_, b)| **b != 0)
                .map(|(i, b)| (i as u32 + LPI_BASE, *b))
                .collect(),
            lpi_pending: self.lpi_pending.iter().collect(),
        }
    }

    pub(crate) fn restore(&mut self, s: &RedistState) -> Result<(), StateError> {
        if s.priority.len() != 32 {
            return Err(StateError::Length {
                what: "GICR priorities",
                got: s.priority.len(),
                want: 32,
            });
        }
        self.propbaser = s.propbaser & GICR_PROPBASER_MASK;
        self.pendbaser = s.pendbaser & (GICR_PENDBASER_MASK | GICR_PENDBASER_PTZ);
        self.enable_lpis = s.enable_lpis;
        self.processor_sleep = s.processor_sleep;
        self.group = s.group;
        self.enable = s.enable;
        self.pending = s.pending;
        self.line = s.line & 0xFFFF_0000;
        self.active = s.active;
        self.set_icfgr1(s.icfgr1);
        for (d, p) in self.priority.iter_mut().zip(&s.priority) {
            *d = p & PRIORITY_MASK;
        }
        self.lpi_cfg.clear();
        self.lpi_pending.clear();
        self.lpi_ready.clear();
        self.touched = true;
        if self.enable_lpis {
            let end = self.lpi_end();
            self.lpi_cfg.resize((end - LPI_BASE) as usize, 0);
            for (intid, b) in &s.lpi_config {
                if !self.lpi_in_range(*intid) {
                    return Err(StateError::Range {
                        what: "cached LPI INTID",
                        value: *intid as u64,
                    });
                }
                self.lpi_cfg[(*intid - LPI_BASE) as usize] = *b;
            }
            for intid in &s.lpi_pending {
                if !self.lpi_in_range(*intid) {
                    return Err(StateError::Range {
                        what: "pending LPI INTID",
                        value: *intid as u64,
                    });
                }
                self.lpi_pending.insert(*intid);
            }
            self.rebuild_ready();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_set_keeps_priority_order_across_the_small_large_switch() {
        let mut r = ReadySet::default();
        // 200 keys, inserted out of order, with mixed priorities.
        for i in 0..200u32 {
            let intid = 8192 + (i * 37) % 200;
            r.insert((((intid % 4) * 0x20) as u8, intid));
        }
        assert!(matches!(r, ReadySet::Large(_)));
        r.insert((0, 8192)); // duplicate: no change
        let mut got = Vec::new();
        while let Some(k) = r.first() {
            got.push(k);
            r.remove(k);
        }
        assert_eq!(got.len(), 200);
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "ascending (priority, INTID)"
        );
        assert!(matches!(r, ReadySet::Small(_)), "back to the vector");
    }

    #[test]
    fn lpi_set_inserts_removes_and_iterates_in_order() {
        let mut s = LpiSet::default();
        assert!(s.insert(8300));
        assert!(!s.insert(8300));
        assert!(s.insert(8192));
        assert!(s.insert(65535));
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![8192, 8300, 65535]);
        assert!(s.remove(8300));
        assert!(!s.remove(8300));
        assert!(!s.contains(8300) && s.contains(65535));
        s.clear();
        assert_eq!(s.iter().count(), 0);
    }
}
