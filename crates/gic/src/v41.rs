//! GICv4.1: vPEs, their residency on redistributors, virtual LPIs kept in virtual pending
//! tables (VPTs) in guest memory, direct vSGIs, the default doorbell delivered at most once per
//! non-residency phase, and the virtual CPU interface (`ICV_*`) of the resident vPE.
//!
//! What lives where:
//! - guest memory (architected): each vPE's VPT (bit `vINTID % 8` of byte `vINTID / 8`, as a
//!   physical pending table) and vLPI property table (VConf, one byte per vINTID at
//!   `vINTID - 8192`), the vPE configuration tables of the ITSs (GITS_BASER2) and
//!   redistributors (GICR_VPROPBASER), the ITTs whose entries map events to vINTIDs.
//! - the model (IMPLEMENTATION DEFINED "GIC-internal storage"): per vPE the mapping, the vLPI
//!   configuration cache, vSGI configuration and pending bits, whether a doorbell is armed,
//!   and the guest's ICV state (standing in for the hypervisor's ICH_VMCR/ICH_AP*R
//!   save/restore, so it follows the vPE).
//!
//! CONSTRAINED UNPREDICTABLE situations do something documented and are recorded as
//! [`UnpredictableEvent`]s, so tests can detect a driver that provoked one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::access::{half64, merge_part, only32, read_part};
use crate::config::V41Config;
use crate::error::{MemError, MmioError, StateError};
use crate::its::ItsCommandError;
use crate::mem::{GuestMem, LoggedMem};
use crate::redist::Redistributor;
use crate::regs::*;

/// Number of unpredictable-event records kept (oldest dropped first).
pub const UNPREDICTABLE_RECORDS: usize = 64;

/// A CONSTRAINED UNPREDICTABLE (or UNPREDICTABLE) situation software created, with the
/// outcome the model chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnpredictableEvent {
    /// GICR_INVLPIR/GICR_INVALLR with V = 1 written while GICR_SYNCR.Busy = 1: the second
    /// invalidation is ignored.
    InvalidateWhileBusy {
        /// Redistributor (PE index).
        rd: usize,
        /// vPEID named by the ignored write.
        vpeid: u32,
    },
    /// A register-based invalidation named a vPE that is not mapped to this redistributor
    /// (nor to one sharing its vPE table): ignored.
    InvalidateWrongRd {
        /// Redistributor written.
        rd: usize,
        /// vPEID named.
        vpeid: u32,
    },
    /// GICR_VSGIPENDR was read on a redistributor the vPE named by GICR_VSGIR is not mapped
    /// to (for example after a racing VMOVP): Pending reads as 0.
    VsgiReadWrongRd {
        /// Redistributor read.
        rd: usize,
        /// vPEID named by GICR_VSGIR.
        vpeid: u32,
    },
    /// GICR_VPENDBASER written with Valid = 1 while already Valid: ignored.
    VpendbaserWhileValid {
        /// Redistributor.
        rd: usize,
    },
    /// A vPE was made resident but its vPE table entry (through GICR_VPROPBASER) is not
    /// valid, or GICR_VPROPBASER itself is not: the vPE is not made resident.
    ResidentUnmapped {
        /// Redistributor.
        rd: usize,
        /// vPEID.
        vpeid: u32,
    },
    /// A vPE was made resident on a redistributor that does not share the vPE table with
    /// the one it is mapped to: it is made resident anyway (interrupts follow the vPE).
    ResidentOnOtherRd {
        /// Redistributor it was made resident on.
        rd: usize,
        /// vPEID.
        vpeid: u32,
        /// Redistributor the vPE is mapped to.
        mapped: usize,
    },
    /// A vPE was made resident while already resident elsewhere: ignored.
    ResidentTwice {
        /// Redistributor written.
        rd: usize,
        /// vPEID.
        vpeid: u32,
    },
    /// VMAPP with Alloc = 0 for a vPE no ITS has allocated: treated as Alloc = 1.
    MapWithoutAlloc {
        /// vPEID.
        vpeid: u32,
    },
    /// A vPE was unmapped (VMAPP V = 0, Alloc = 1) or moved (VMOVP) while resident: it is
    /// made non-resident (unmap) or moved anyway.
    ChangedWhileResident {
        /// vPEID.
        vpeid: u32,
    },
    /// GICR_VPROPBASER written while a vPE is resident on that redistributor: ignored.
    VpropbaserWhileResident {
        /// Redistributor.
        rd: usize,
    },
    /// GICD_CTLR.nASSGIreq changed while a group was enabled: the change is ignored.
    NassgireqWhileEnabled,
}

/// Saved state of the guest's virtual CPU interface for one vPE.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IcvState {
    /// ICV_PMR_EL1.
    pub pmr: u8,
    /// ICV_IGRPEN0_EL1.
    pub igrpen0: bool,
    /// ICV_IGRPEN1_EL1.
    pub igrpen1: bool,
    /// Group 0 active priorities, one bit per level (bit 0 highest).
    pub ap0: u32,
    /// Group 1 active priorities.
    pub ap1: u32,
    /// ICV_CTLR_EL1.EOImode: 1 = ICV_EOIR only drops priority, ICV_DIR deactivates.
    #[serde(default)]
    pub eoimode: bool,
    /// ICV_BPR0_EL1 (values below the minimum read as the minimum).
    #[serde(default)]
    pub bpr0: u8,
    /// ICV_BPR1_EL1 (values below the minimum read as the minimum).
    #[serde(default)]
    pub bpr1: u8,
}

/// One vPE as the GIC knows it (the model's copy of the vPE table entry plus the state the
/// architecture leaves to the implementation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpeState {
    /// vPEID.
    pub vpeid: u32,
    /// Processor_Number of the redistributor the vPE is mapped to (VMAPP / VMOVP RDbase).
    pub rd: usize,
    /// VPT physical address (64 KiB aligned).
    pub vpt: u64,
    /// vINTID bits the VPT and VConf cover (VMAPP VPT_size + 1).
    pub vpt_bits: u8,
    /// vLPI property table physical address.
    pub vconf: u64,
    /// Default doorbell pINTID (1023: none).
    pub default_db: u32,
    /// Bit n set: mapped on ITS n (VMAPP V = 1 there).
    pub its_mapped: u16,
    /// vSGI enables.
    pub sgi_enable: u16,
    /// vSGI groups (1 = Group 1).
    pub sgi_group: u16,
    /// vSGI priorities (only bits \[7:4\] are kept, as VSGI carries them).
    pub sgi_priority: [u8; 16],
    /// vSGI pending bits.
    pub sgi_pending: u16,
    /// Pending vINTIDs (mirror of the VPT, reloaded from it on every load).
    pub vlpi_pending: BTreeSet<u32>,
    /// Cached vLPI configuration bytes, indexed by vINTID - 8192 (refreshed by VMAPP, INV,
    /// VINVALL, GICR_INVLPIR/INVALLR with V = 1).
    pub vlpi_cfg: Vec<u8>,
    /// Redistributor the vPE is resident on.
    pub resident_on: Option<usize>,
    /// Redistributor the vPE was last resident on (cleared by VMAPP/VMOVP). Inside a
    /// CommonLPIAff group software may skip VMOVP, so the default doorbell is raised where
    /// the vPE last ran when that redistributor shares the vPE table with `rd`.
    #[serde(default)]
    pub last_resident: Option<usize>,
    /// A doorbell was requested and PendingLast read back 0 (or the vPE has never been
    /// resident): the next deliverable interrupt raises the default doorbell, once.
    pub db_armed: bool,
    /// vGrp0En / vGrp1En of the vPE's last residency (both set for a vPE that has never been
    /// resident): the groups PendingLast and the doorbell consider while it is away.
    #[serde(default = "both_groups")]
    pub vgrp_en: [bool; 2],
    /// Default doorbells raised for this vPE.
    pub doorbells: u64,
    /// Individual (per-vLPI) doorbells raised for this vPE's vLPIs.
    #[serde(default)]
    pub individual_doorbells: u64,
    /// The guest's virtual CPU interface.
    pub icv: IcvState,
}

impl VpeState {
    fn cfg_of(&self, vintid: u32) -> u8 {
        vintid
            .checked_sub(LPI_BASE)
            .and_then(|i| self.vlpi_cfg.get(i as usize))
            .copied()
            .unwrap_or(0)
    }

    fn vlpi_end(&self) -> u32 {
        if self.vpt_bits < 14 {
            LPI_BASE
        } else {
            1u32 << self.vpt_bits
        }
    }

    /// Whether an interrupt is pending, enabled and of a group enabled in `vgrp_en`
    /// (`[vGrp0En, vGrp1En]`): what PendingLast and the default doorbell report (IHI 0069,
    /// GICR_VPENDBASER.PendingLast; priority does not matter to them). vLPIs are Group 1.
    pub fn has_deliverable(&self, vgrp_en: [bool; 2]) -> bool {
        let groups = (if vgrp_en[1] { self.sgi_group } else { 0 })
            | (if vgrp_en[0] { !self.sgi_group } else { 0 });
        self.sgi_pending & self.sgi_enable & groups != 0
            || (vgrp_en[1]
                && self
                    .vlpi_pending
                    .iter()
                    .any(|&i| self.cfg_of(i) & LPI_PROP_ENABLE != 0))
    }
}

fn both_groups() -> [bool; 2] {
    [true, true]
}

/// Saved GICv4.1 state of one redistributor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdV41State {
    /// GICR_VPROPBASER.
    pub vpropbaser: u64,
    /// GICR_VPENDBASER (Dirty excluded).
    pub vpendbaser: u64,
    /// Reads left with VPENDBASER.Dirty = 1.
    pub dirty_reads: u32,
    /// GICR_VSGIR.
    pub vsgir: u32,
    /// Reads left with VSGIPENDR.Busy = 1.
    pub vsgi_busy_reads: u32,
    /// Reads left with SYNCR.Busy = 1.
    pub syncr_busy_reads: u32,
    /// GICv4.0: the vPE whose VPT GICR_VPENDBASER names, while Valid (GICv4.0 registers
    /// carry no vPEID; the GIC finds the vPE by its VPT address).
    #[serde(default)]
    pub v40_resident: Option<u32>,
    /// GICv4.0: a VPT no vPE maps was made resident and held a pending, enabled vLPI when
    /// it was parsed (what PendingLast reports when it is made non-resident).
    #[serde(default)]
    pub v40_unmapped_pending: bool,
}

/// Saved GICv4.1 state of the whole GIC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct V41State {
    /// Per redistributor.
    pub rds: Vec<RdV41State>,
    /// Every allocated vPE.
    pub vpes: Vec<VpeState>,
    /// Unpredictable-event records, oldest first.
    pub events: Vec<UnpredictableEvent>,
    /// Unpredictable events ever recorded.
    pub event_count: u64,
    /// VMOVP commands executed (all ITSs).
    pub vmovps: u64,
    /// Default doorbells raised (all vPEs).
    pub doorbells: u64,
}

/// Counters of GICv4.1 activity, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct V41Stats {
    /// VMOVP commands executed (all ITSs).
    pub vmovps: u64,
    /// Default doorbells raised.
    pub doorbells: u64,
    /// Individual (per-vLPI) doorbells raised.
    pub individual_doorbells: u64,
    /// vLPIs and vSGIs acknowledged through ICV_IAR0/1.
    pub virtual_acks: u64,
    /// Unpredictable events recorded.
    pub unpredictable: u64,
}

#[derive(Debug, Default)]
pub(crate) struct RdV41 {
    vpropbaser: u64,
    vpendbaser: u64,
    v40_resident: Option<u32>,
    v40_unmapped_pending: bool,
    dirty: AtomicU32,
    vsgir: u32,
    vsgi_busy: AtomicU32,
    syncr_busy: AtomicU32,
}

#[derive(Debug, Default)]
struct EventLog {
    records: VecDeque<UnpredictableEvent>,
    count: u64,
}

/// Result of locating a vPE table entry.
pub(crate) enum VSlot {
    At(u64),
    OutOfRange,
    NoL2,
}

/// Locates entry `index` (of `esz` bytes) of a flat or two-level table of `pages` pages of
/// `page` bytes at `base`. Level-1 entries are 8 bytes: Valid bit 63, level-2 page address in
/// bits \[51:12\].
pub(crate) fn table_slot<M: GuestMem>(
    mem: &LoggedMem<M>,
    base: u64,
    page: u64,
    pages: u64,
    indirect: bool,
    esz: u64,
    index: u64,
) -> Result<VSlot, MemError> {
    let bytes = pages * page;
    if !indirect {
        return Ok(if (index + 1) * esz <= bytes {
            VSlot::At(base + index * esz)
        } else {
            VSlot::OutOfRange
        });
    }
    let per_page = page / esz;
    let l1 = index / per_page;
    if (l1 + 1) * 8 > bytes {
        return Ok(VSlot::OutOfRange);
    }
    let l1e = mem.read_u64(base + l1 * 8)?;
    if l1e & GITS_L1E_VALID == 0 {
        return Ok(VSlot::NoL2);
    }
    let l2 = l1e & GITS_L1E_PA_MASK & !(page - 1);
    Ok(VSlot::At(l2 + (index % per_page) * esz))
}

fn page_size(code: u64) -> u64 {
    match code & 3 {
        0 => 0x1000,
        1 => 0x4000,
        _ => 0x1_0000,
    }
}

/// Encodes the first two words of a vPE table entry.
pub(crate) fn vpe_entry(v: &VpeState) -> [u64; 4] {
    [
        VPTE_VALID
            | (((v.vpt_bits.saturating_sub(1) as u64) & 0x1F) << VPTE_VPT_SIZE_SHIFT)
            | (v.vpt & VPTE_ADDR_MASK),
        (v.vconf & VPTE_VCONF_MASK) | (v.rd as u64 & 0xFFFF),
        v.default_db as u64,
        0,
    ]
}

/// A virtual interrupt the CPU interface may present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VCandidate {
    pub(crate) intid: u32,
    pub(crate) prio: u8,
    pub(crate) group1: bool,
}

/// The GICv4.1 part of the GIC.
#[derive(Debug)]
pub(crate) struct V41 {
    pub(crate) cfg: V41Config,
    pub(crate) rds: Vec<RdV41>,
    pub(crate) vpes: BTreeMap<u32, VpeState>,
    events: Mutex<EventLog>,
    pub(crate) vmovps: u64,
    pub(crate) doorbells: u64,
    pub(crate) individual_doorbells: u64,
    pub(crate) virtual_acks: u64,
    affinities: Vec<u32>,
}

impl V41 {
    pub(crate) fn new(cfg: V41Config, affinities: &[u32]) -> Self {
        V41 {
            rds: affinities
                .iter()
                .map(|_| RdV41 {
                    // GICv4.0's VPROPBASER has no read-only Entry_Size field.
                    vpropbaser: if cfg.v4_0 {
                        0
                    } else {
                        (VPE_ENTRY_SIZE / 8 - 1) << VPROPBASER_ENTRY_SIZE_SHIFT
                    },
                    ..RdV41::default()
                })
                .collect(),
            cfg,
            vpes: BTreeMap::new(),
            events: Mutex::new(EventLog::default()),
            vmovps: 0,
            doorbells: 0,
            individual_doorbells: 0,
            virtual_acks: 0,
            affinities: affinities.to_vec(),
        }
    }

    pub(crate) fn record(&self, e: UnpredictableEvent) {
        let mut log = match self.events.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if log.records.len() == UNPREDICTABLE_RECORDS {
            log.records.pop_front();
        }
        log.records.push_back(e);
        log.count += 1;
    }

    pub(crate) fn events(&self) -> (Vec<UnpredictableEvent>, u64) {
        let log = match self.events.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        (log.records.iter().copied().collect(), log.count)
    }

    pub(crate) fn stats(&self) -> V41Stats {
        V41Stats {
            vmovps: self.vmovps,
            doorbells: self.doorbells,
            individual_doorbells: self.individual_doorbells,
            virtual_acks: self.virtual_acks,
            unpredictable: self.events().1,
        }
    }

    /// GICR_TYPER bits a GICv4.1 redistributor adds.
    pub(crate) fn typer_bits(&self) -> u64 {
        if self.cfg.v4_0 {
            // GICv4.0: VLPIS only (RVPEID, Dirty, VSGI and vPE-table sharing are GICv4.1).
            return GICR_TYPER_VLPIS;
        }
        GICR_TYPER_VLPIS
            | GICR_TYPER_RVPEID
            | if self.cfg.dirty { GICR_TYPER_DIRTY } else { 0 }
            | ((self.cfg.common_lpi_aff as u64 & 3) << GICR_TYPER_COMMONLPIAFF_SHIFT)
            | if self.cfg.nassgi_cap {
                GICR_TYPER_VSGI
            } else {
                0
            }
    }

    /// Sharing-group key of a redistributor (Linux's `compute_common_aff`).
    fn group_key(&self, pe: usize) -> u32 {
        let aff = self.affinities.get(pe).copied().unwrap_or(0);
        let keep = !(0xFFFF_FFFFu32 >> (self.cfg.common_lpi_aff as u32 * 8));
        aff & keep
    }

    /// Whether redistributors `a` and `b` share a vPE configuration table.
    pub(crate) fn share_table(&self, a: usize, b: usize) -> bool {
        self.group_key(a) == self.group_key(b)
    }

    pub(crate) fn vpeid_valid(&self, vpeid: u32) -> bool {
        (vpeid as u64) >> self.cfg.vpeid_bits == 0
    }

    /// Locates vPE `vpeid`'s entry in redistributor `pe`'s vPE table.
    fn rd_slot<M: GuestMem>(
        &self,
        mem: &LoggedMem<M>,
        pe: usize,
        vpeid: u32,
    ) -> Result<VSlot, MemError> {
        let v = self.rds[pe].vpropbaser;
        // A GICv4.0 redistributor has no vPE table (VPROPBASER names a VConf table).
        if self.cfg.v4_0 || v & VPROPBASER_VALID == 0 || !self.vpeid_valid(vpeid) {
            return Ok(VSlot::OutOfRange);
        }
        let page = page_size(v >> VPROPBASER_PAGE_SIZE_SHIFT);
        table_slot(
            mem,
            v & VPROPBASER_PA_MASK & !(page - 1),
            page,
            (v & VPROPBASER_SIZE_MASK) + 1,
            v & VPROPBASER_INDIRECT != 0,
            VPE_ENTRY_SIZE,
            vpeid as u64,
        )
    }

    /// Writes (or clears) vPE `vpeid`'s entry in every redistributor's vPE table that has a
    /// slot for it (the GIC keeps the copies coherent; shared tables get the same bytes).
    pub(crate) fn propagate_entry<M: GuestMem>(
        &self,
        mem: &mut LoggedMem<M>,
        vpeid: u32,
        entry: [u64; 4],
    ) -> Result<(), MemError> {
        let mut done = BTreeSet::new();
        for pe in 0..self.rds.len() {
            if let VSlot::At(a) = self.rd_slot(mem, pe, vpeid)? {
                if done.insert(a) {
                    write_entry(mem, a, entry)?;
                }
            }
        }
        Ok(())
    }

    /// Loads vPE `vpeid`'s vLPI configuration cache from its VConf table.
    pub(crate) fn reload_config<M: GuestMem>(&mut self, mem: &LoggedMem<M>, vpeid: u32) {
        if let Some(v) = self.vpes.get_mut(&vpeid) {
            let n = (v.vlpi_end() - LPI_BASE) as usize;
            v.vlpi_cfg.clear();
            v.vlpi_cfg.resize(n, 0);
            if mem.read(v.vconf, &mut v.vlpi_cfg).is_err() {
                v.vlpi_cfg.iter_mut().for_each(|b| *b = 0);
            }
        }
    }

    /// Reloads one vINTID's configuration byte.
    pub(crate) fn reload_one<M: GuestMem>(&mut self, mem: &LoggedMem<M>, vpeid: u32, vintid: u32) {
        if let Some(v) = self.vpes.get_mut(&vpeid) {
            let Some(idx) = vintid.checked_sub(LPI_BASE) else {
                return;
            };
            let addr = v.vconf + idx as u64;
            if let Some(slot) = v.vlpi_cfg.get_mut(idx as usize) {
                *slot = mem.read_u8(addr).unwrap_or(0);
            }
        }
    }

    /// Reads vPE `vpeid`'s VPT into its pending mirror (what a redistributor does when it
    /// loads the vPE, and VMAPP with PTZ = 0).
    pub(crate) fn load_vpt<M: GuestMem>(&mut self, mem: &LoggedMem<M>, vpeid: u32) {
        let Some(v) = self.vpes.get_mut(&vpeid) else {
            return;
        };
        v.vlpi_pending.clear();
        let first = (LPI_BASE / 8) as u64;
        let bytes = (v.vlpi_end() / 8) as u64 - first;
        let mut buf = vec![0u8; bytes as usize];
        if mem.read(v.vpt + first, &mut buf).is_err() {
            return;
        }
        for (i, b) in buf.iter().enumerate() {
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    v.vlpi_pending.insert((first as u32 + i as u32) * 8 + bit);
                }
            }
        }
    }

    /// Raises the default doorbell of a non-resident vPE if one is armed and an interrupt is
    /// deliverable (the at-most-once-per-non-residency-phase rule: firing disarms it).
    pub(crate) fn check_doorbell<M: GuestMem>(
        &mut self,
        rds: &mut [Redistributor],
        mem: &mut LoggedMem<M>,
        vpeid: u32,
    ) -> Result<(), MemError> {
        let Some(v) = self.vpes.get(&vpeid) else {
            return Ok(());
        };
        if v.resident_on.is_some() || !v.db_armed || !v.has_deliverable(v.vgrp_en) {
            return Ok(());
        }
        let target = match v.last_resident {
            Some(l) if self.share_table(l, v.rd) => l,
            _ => v.rd,
        };
        let Some(v) = self.vpes.get_mut(&vpeid) else {
            return Ok(());
        };
        v.db_armed = false;
        if v.default_db != INTID_NO_DOORBELL {
            v.doorbells += 1;
            self.doorbells += 1;
            if let Some(rd) = rds.get_mut(target) {
                rd.set_lpi_pending(mem, v.default_db, true)?;
            }
        }
        Ok(())
    }

    /// Sets or clears a vLPI's pending state (VPT write-through). `individual_db` is the
    /// ITE's per-vLPI doorbell (1023: none), raised every time the vLPI becomes pending while
    /// the vPE is not resident (GICv4.0 semantics).
    pub(crate) fn set_vlpi_pending<M: GuestMem>(
        &mut self,
        rds: &mut [Redistributor],
        mem: &mut LoggedMem<M>,
        vpeid: u32,
        vintid: u32,
        pending: bool,
        individual_db: u32,
    ) -> Result<(), ItsCommandError> {
        let v = self
            .vpes
            .get_mut(&vpeid)
            .ok_or(ItsCommandError::UnmappedVpe(vpeid))?;
        if !(LPI_BASE..v.vlpi_end()).contains(&vintid) {
            return Err(ItsCommandError::IntIdOutOfRange(vintid));
        }
        let addr = v.vpt + (vintid / 8) as u64;
        let b = mem.read_u8(addr)?;
        let m = 1u8 << (vintid % 8);
        let nb = if pending { b | m } else { b & !m };
        if nb != b {
            mem.write(addr, &[nb])?;
        }
        let newly = if pending {
            v.vlpi_pending.insert(vintid)
        } else {
            v.vlpi_pending.remove(&vintid);
            false
        };
        let rd = v.rd;
        let nonres = v.resident_on.is_none();
        // GICv4.1: once per vLPI becoming pending. GICv4.0: every time the vLPI is made
        // pending while the vPE is not resident (the doorbell stands in for the delivery).
        let raise = if self.cfg.v4_0 { pending } else { newly };
        if raise && nonres && individual_db != INTID_NO_DOORBELL {
            self.individual_doorbells += 1;
            v.individual_doorbells += 1;
            if let Some(r) = rds.get_mut(rd) {
                r.set_lpi_pending(mem, individual_db, true)?;
            }
        }
        if pending {
            self.check_doorbell(rds, mem, vpeid)?;
        }
        Ok(())
    }

    /// Makes vSGI `sgi` of `vpeid` pending (GITS_SGIR).
    pub(crate) fn set_vsgi_pending<M: GuestMem>(
        &mut self,
        rds: &mut [Redistributor],
        mem: &mut LoggedMem<M>,
        vpeid: u32,
        sgi: u32,
    ) -> Result<(), ItsCommandError> {
        let v = self
            .vpes
            .get_mut(&vpeid)
            .ok_or(ItsCommandError::UnmappedVpe(vpeid))?;
        v.sgi_pending |= 1 << (sgi & 0xF);
        self.check_doorbell(rds, mem, vpeid)?;
        Ok(())
    }

    /// The vPE resident on redistributor `pe`. The model parses the VPT synchronously when
    /// Valid goes 0 -> 1, so delivery never waits for software to read Dirty (IHI 0069,
    /// GICR_VPENDBASER.Dirty only reports progress; a hypervisor need not poll it).
    fn loaded_vpe(&self, pe: usize) -> Option<&VpeState> {
        let v = self.vpes.get(&self.resident_vpeid(pe)?)?;
        (v.resident_on == Some(pe)).then_some(v)
    }

    /// vPEID resident on `pe` (whatever the Dirty state).
    pub(crate) fn resident_vpeid(&self, pe: usize) -> Option<u32> {
        let rd = self.rds.get(pe)?;
        if self.cfg.v4_0 {
            return rd
                .v40_resident
                .filter(|_| rd.vpendbaser & VPENDBASER_VALID != 0);
        }
        (rd.vpendbaser & VPENDBASER_VALID != 0)
            .then_some((rd.vpendbaser & VPENDBASER_VPEID_MASK) as u32)
    }

    /// Highest priority pending virtual interrupt of the vPE loaded on `pe` among the groups
    /// enabled both in VPENDBASER (vGrp0En/vGrp1En) and in ICV_IGRPEN0/1. vSGIs win ties
    /// against vLPIs (lower INTID).
    pub(crate) fn vhppi(&self, pe: usize) -> Option<VCandidate> {
        let v = self.loaded_vpe(pe)?;
        // GICv4.0's VPENDBASER has no vGrp0En/vGrp1En (bits [58:56] are OuterCache).
        let pb = if self.cfg.v4_0 {
            VPENDBASER_VGRP0EN | VPENDBASER_VGRP1EN
        } else {
            self.rds[pe].vpendbaser
        };
        let g0 = pb & VPENDBASER_VGRP0EN != 0 && v.icv.igrpen0;
        let g1 = pb & VPENDBASER_VGRP1EN != 0 && v.icv.igrpen1;
        let mut best: Option<VCandidate> = None;
        let mut offer = |c: VCandidate| {
            if best.map_or(true, |b| c.prio < b.prio) {
                best = Some(c);
            }
        };
        let mut bits = v.sgi_pending & v.sgi_enable;
        while bits != 0 {
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            let group1 = v.sgi_group & (1 << i) != 0;
            if (group1 && g1) || (!group1 && g0) {
                offer(VCandidate {
                    intid: i,
                    prio: v.sgi_priority[i as usize] & PRIORITY_MASK,
                    group1,
                });
            }
        }
        if g1 {
            for &i in &v.vlpi_pending {
                let c = v.cfg_of(i);
                if c & LPI_PROP_ENABLE != 0 {
                    offer(VCandidate {
                        intid: i,
                        prio: c & LPI_PROP_PRIORITY_MASK & PRIORITY_MASK,
                        group1: true,
                    });
                }
            }
        }
        best
    }

    /// ICV_IAR of a direct interrupt `c` (from [`V41::vhppi`]) of the vPE resident on `pe`:
    /// vLPIs and vSGIs have no active state, so it only stops being pending (the VPT bit is
    /// cleared in memory). Returns false if the VPT cannot be written (nothing changes).
    pub(crate) fn take_direct<M: GuestMem>(
        &mut self,
        mem: &mut LoggedMem<M>,
        pe: usize,
        c: VCandidate,
    ) -> bool {
        let Some(v) = self.vpe_mut_resident(pe) else {
            return false;
        };
        if c.intid < NUM_SGIS {
            v.sgi_pending &= !(1 << c.intid);
        } else {
            let addr = v.vpt + (c.intid / 8) as u64;
            let Ok(b) = mem.read_u8(addr) else {
                return false;
            };
            if mem.write(addr, &[b & !(1 << (c.intid % 8))]).is_err() {
                return false;
            }
            v.vlpi_pending.remove(&c.intid);
        }
        self.virtual_acks += 1;
        true
    }

    pub(crate) fn vpe_mut_resident(&mut self, pe: usize) -> Option<&mut VpeState> {
        let id = self.resident_vpeid(pe)?;
        self.vpes.get_mut(&id).filter(|v| v.resident_on == Some(pe))
    }

    // ----------------------------------------------------------------------------------
    // Redistributor VLPI_base frame and the V = 1 invalidation registers
    // ----------------------------------------------------------------------------------

    pub(crate) fn read_vlpi(&self, pe: usize, offset: u64, width: u8) -> Result<u64, MmioError> {
        let rd = &self.rds[pe];
        match offset {
            // GICv4.0 has no GICR_VSGIR / GICR_VSGIPENDR: reserved, RAZ.
            GICR_VSGIR | GICR_VSGIPENDR if self.cfg.v4_0 => Ok(0),
            o if (GICR_VPROPBASER..GICR_VPROPBASER + 8).contains(&o) => {
                let pos = half64(GICR_VPROPBASER, o, width)?;
                Ok(read_part(rd.vpropbaser, pos, width))
            }
            o if (GICR_VPENDBASER..GICR_VPENDBASER + 8).contains(&o) => {
                let pos = half64(GICR_VPENDBASER, o, width)?;
                let mut v = rd.vpendbaser;
                // Dirty counts down on reads of the half that holds it.
                if pos == 4 || width == 8 {
                    let d = rd.dirty.load(Ordering::Relaxed);
                    if d > 0 {
                        v |= VPENDBASER_DIRTY;
                        rd.dirty.store(d - 1, Ordering::Relaxed);
                    }
                }
                Ok(read_part(v, pos, width))
            }
            GICR_VSGIR => only32(offset, width).map(|_| rd.vsgir as u64),
            GICR_VSGIPENDR => {
                only32(offset, width)?;
                let b = rd.vsgi_busy.load(Ordering::Relaxed);
                if b > 0 {
                    rd.vsgi_busy.store(b - 1, Ordering::Relaxed);
                    return Ok(VSGIPENDR_BUSY as u64);
                }
                let vpeid = rd.vsgir;
                match self.vpes.get(&vpeid) {
                    Some(v) if self.share_table(v.rd, pe) => Ok(v.sgi_pending as u64),
                    _ => {
                        self.record(UnpredictableEvent::VsgiReadWrongRd { rd: pe, vpeid });
                        Ok(0)
                    }
                }
            }
            _ => Ok(0),
        }
    }

    pub(crate) fn write_vlpi<M: GuestMem>(
        &mut self,
        mem: &mut LoggedMem<M>,
        pe: usize,
        offset: u64,
        width: u8,
        value: u64,
    ) -> Result<(), MmioError> {
        if self.cfg.v4_0 {
            return self.write_vlpi_v40(mem, pe, offset, width, value);
        }
        match offset {
            o if (GICR_VPROPBASER..GICR_VPROPBASER + 8).contains(&o) => {
                let pos = half64(GICR_VPROPBASER, o, width)?;
                if self.rds[pe].vpendbaser & VPENDBASER_VALID != 0 {
                    self.record(UnpredictableEvent::VpropbaserWhileResident { rd: pe });
                    return Ok(());
                }
                let ro = (VPE_ENTRY_SIZE / 8 - 1) << VPROPBASER_ENTRY_SIZE_SHIFT;
                let mut v =
                    merge_part(self.rds[pe].vpropbaser, value, pos, width) & VPROPBASER_RW_MASK;
                // Page_Size 0b11 is reserved: treated as 64 KiB, reads back as 0b10.
                if (v >> VPROPBASER_PAGE_SIZE_SHIFT) & 3 == 3 {
                    v &= !(1 << VPROPBASER_PAGE_SIZE_SHIFT);
                }
                self.rds[pe].vpropbaser = v | ro;
                Ok(())
            }
            o if (GICR_VPENDBASER..GICR_VPENDBASER + 8).contains(&o) => {
                let pos = half64(GICR_VPENDBASER, o, width)?;
                let old = self.rds[pe].vpendbaser;
                let new = merge_part(old, value, pos, width)
                    & (VPENDBASER_VPEID_MASK
                        | VPENDBASER_VGRP0EN
                        | VPENDBASER_VGRP1EN
                        | VPENDBASER_PENDING_LAST
                        | VPENDBASER_DB
                        | VPENDBASER_VALID);
                self.write_vpendbaser(mem, pe, old, new);
                Ok(())
            }
            GICR_VSGIR => {
                only32(offset, width)?;
                let vpeid = value as u32 & 0xFFFF;
                self.rds[pe].vsgir = vpeid;
                self.rds[pe]
                    .vsgi_busy
                    .store(self.cfg.busy_reads, Ordering::Relaxed);
                Ok(())
            }
            GICR_VSGIPENDR => only32(offset, width),
            _ => Ok(()),
        }
    }

    fn write_vpendbaser<M: GuestMem>(
        &mut self,
        mem: &mut LoggedMem<M>,
        pe: usize,
        old: u64,
        new: u64,
    ) {
        let was_valid = old & VPENDBASER_VALID != 0;
        let valid = new & VPENDBASER_VALID != 0;
        let busy = self.cfg.busy_reads;
        match (was_valid, valid) {
            (false, false) => self.rds[pe].vpendbaser = new,
            (true, true) => self.record(UnpredictableEvent::VpendbaserWhileValid { rd: pe }),
            (false, true) => {
                let vpeid = (new & VPENDBASER_VPEID_MASK) as u32;
                let entry_ok = matches!(self.rd_slot(mem, pe, vpeid), Ok(VSlot::At(a))
                    if mem.read_u64(a).is_ok_and(|w| w & VPTE_VALID != 0));
                let Some(v) = self.vpes.get(&vpeid).filter(|_| entry_ok) else {
                    self.record(UnpredictableEvent::ResidentUnmapped { rd: pe, vpeid });
                    return;
                };
                if v.resident_on.is_some() {
                    self.record(UnpredictableEvent::ResidentTwice { rd: pe, vpeid });
                    return;
                }
                if !self.share_table(v.rd, pe) {
                    let mapped = v.rd;
                    self.record(UnpredictableEvent::ResidentOnOtherRd {
                        rd: pe,
                        vpeid,
                        mapped,
                    });
                }
                self.load_vpt(mem, vpeid);
                if let Some(v) = self.vpes.get_mut(&vpeid) {
                    v.resident_on = Some(pe);
                    v.last_resident = Some(pe);
                    v.db_armed = false;
                    v.vgrp_en = [new & VPENDBASER_VGRP0EN != 0, new & VPENDBASER_VGRP1EN != 0];
                }
                let rd = &mut self.rds[pe];
                rd.vpendbaser = new & !(VPENDBASER_PENDING_LAST | VPENDBASER_DB);
                rd.dirty
                    .store(if self.cfg.dirty { busy } else { 0 }, Ordering::Relaxed);
            }
            (true, false) => {
                let vpeid = (old & VPENDBASER_VPEID_MASK) as u32;
                let want_db = new & VPENDBASER_DB != 0;
                let mut pending = false;
                if let Some(v) = self.vpes.get_mut(&vpeid) {
                    if v.resident_on == Some(pe) {
                        v.resident_on = None;
                        pending = v.has_deliverable(v.vgrp_en);
                        // PendingLast read back 0 with DB = 1: the GIC guarantees a doorbell
                        // when an interrupt comes, and only one.
                        v.db_armed = want_db && !pending;
                    }
                }
                let rd = &mut self.rds[pe];
                rd.vpendbaser = (old & !(VPENDBASER_VALID | VPENDBASER_PENDING_LAST))
                    & !VPENDBASER_DB
                    | (new & VPENDBASER_DB)
                    | if pending { VPENDBASER_PENDING_LAST } else { 0 };
                rd.dirty.store(busy, Ordering::Relaxed);
            }
        }
    }

    /// GICR_SYNCR read on `pe`: Busy while a V = 1 invalidation is in flight.
    pub(crate) fn read_syncr(&self, pe: usize) -> u64 {
        let rd = &self.rds[pe];
        let b = rd.syncr_busy.load(Ordering::Relaxed);
        if b > 0 {
            rd.syncr_busy.store(b - 1, Ordering::Relaxed);
            GICR_SYNCR_BUSY as u64
        } else {
            0
        }
    }

    /// GICR_INVLPIR (`all` false) / GICR_INVALLR (`all` true) with V = 1 on `pe`. Returns
    /// the vPEID whose configuration was reloaded (None when the write was ignored).
    pub(crate) fn invalidate<M: GuestMem>(
        &mut self,
        mem: &LoggedMem<M>,
        pe: usize,
        value: u64,
        all: bool,
    ) -> Option<u32> {
        let vpeid = ((value >> GICR_INV_VPEID_SHIFT) & 0xFFFF) as u32;
        if self.rds[pe].syncr_busy.load(Ordering::Relaxed) != 0 {
            self.record(UnpredictableEvent::InvalidateWhileBusy { rd: pe, vpeid });
            return None;
        }
        match self.vpes.get(&vpeid) {
            Some(v) if self.share_table(v.rd, pe) => {}
            _ => {
                self.record(UnpredictableEvent::InvalidateWrongRd { rd: pe, vpeid });
                return None;
            }
        }
        if all {
            self.reload_config(mem, vpeid);
        } else {
            self.reload_one(mem, vpeid, value as u32);
        }
        self.rds[pe]
            .syncr_busy
            .store(self.cfg.busy_reads, Ordering::Relaxed);
        Some(vpeid)
    }

    // ----------------------------------------------------------------------------------
    // Save / restore
    // ----------------------------------------------------------------------------------

    pub(crate) fn state(&self) -> V41State {
        let (events, event_count) = self.events();
        V41State {
            rds: self
                .rds
                .iter()
                .map(|r| RdV41State {
                    vpropbaser: r.vpropbaser,
                    vpendbaser: r.vpendbaser,
                    dirty_reads: r.dirty.load(Ordering::Relaxed),
                    vsgir: r.vsgir,
                    vsgi_busy_reads: r.vsgi_busy.load(Ordering::Relaxed),
                    syncr_busy_reads: r.syncr_busy.load(Ordering::Relaxed),
                    v40_resident: r.v40_resident,
                    v40_unmapped_pending: r.v40_unmapped_pending,
                })
                .collect(),
            vpes: self.vpes.values().cloned().collect(),
            events,
            event_count,
            vmovps: self.vmovps,
            doorbells: self.doorbells,
        }
    }

    pub(crate) fn restore(&mut self, s: &V41State) -> Result<(), StateError> {
        if s.rds.len() != self.rds.len() {
            return Err(StateError::Length {
                what: "GICv4.1 redistributor states",
                got: s.rds.len(),
                want: self.rds.len(),
            });
        }
        for (r, st) in self.rds.iter_mut().zip(&s.rds) {
            if self.cfg.v4_0 {
                r.vpropbaser = st.vpropbaser & VPROPBASER_V40_RW_MASK;
                r.vpendbaser = st.vpendbaser & VPENDBASER_V40_RW_MASK;
            } else {
                r.vpropbaser = (st.vpropbaser & VPROPBASER_RW_MASK)
                    | ((VPE_ENTRY_SIZE / 8 - 1) << VPROPBASER_ENTRY_SIZE_SHIFT);
                r.vpendbaser = st.vpendbaser & !VPENDBASER_DIRTY;
            }
            r.v40_resident = st.v40_resident.filter(|_| self.cfg.v4_0);
            r.v40_unmapped_pending = st.v40_unmapped_pending && self.cfg.v4_0;
            r.dirty.store(st.dirty_reads, Ordering::Relaxed);
            r.vsgir = st.vsgir & 0xFFFF;
            r.vsgi_busy.store(st.vsgi_busy_reads, Ordering::Relaxed);
            r.syncr_busy.store(st.syncr_busy_reads, Ordering::Relaxed);
        }
        self.vpes.clear();
        for v in &s.vpes {
            if !self.vpeid_valid(v.vpeid) {
                return Err(StateError::Range {
                    what: "vPEID",
                    value: v.vpeid as u64,
                });
            }
            if v.rd >= self.rds.len() || v.resident_on.is_some_and(|r| r >= self.rds.len()) {
                return Err(StateError::Range {
                    what: "vPE redistributor",
                    value: v.rd as u64,
                });
            }
            if v.vpt_bits > 16 {
                return Err(StateError::Range {
                    what: "vPE VPT bits",
                    value: v.vpt_bits as u64,
                });
            }
            self.vpes.insert(v.vpeid, v.clone());
        }
        {
            let mut log = match self.events.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            log.records = s
                .events
                .iter()
                .rev()
                .take(UNPREDICTABLE_RECORDS)
                .rev()
                .copied()
                .collect();
            log.count = s.event_count;
        }
        self.vmovps = s.vmovps;
        self.doorbells = s.doorbells;
        Ok(())
    }
}

pub(crate) fn write_entry<M: GuestMem>(
    mem: &mut LoggedMem<M>,
    addr: u64,
    entry: [u64; 4],
) -> Result<(), MemError> {
    let mut bytes = [0u8; VPE_ENTRY_SIZE as usize];
    for (i, w) in entry.iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    mem.write(addr, &bytes)
}

impl V41 {
    /// Makes whatever vPE is resident on `pe` non-resident without a doorbell (used when the
    /// vPE is unmapped under the redistributor's feet).
    pub(crate) fn force_nonresident(&mut self, pe: usize) {
        if let Some(v) = self.vpe_mut_resident(pe) {
            v.resident_on = None;
        }
        if let Some(rd) = self.rds.get_mut(pe) {
            rd.vpendbaser &= !VPENDBASER_VALID;
            rd.vpendbaser |= VPENDBASER_PENDING_LAST;
            rd.v40_resident = None;
        }
    }
}

// --------------------------------------------------------------------------------------
// GICv4.0: VLPI frame with addresses instead of vPEIDs
// --------------------------------------------------------------------------------------

impl V41 {
    /// GICv4.0 VLPI_base frame writes: VPROPBASER (VConf address + IDbits) and VPENDBASER
    /// (VPT address, IDAI, PendingLast, Valid). Everything else is reserved (WI).
    fn write_vlpi_v40<M: GuestMem>(
        &mut self,
        mem: &mut LoggedMem<M>,
        pe: usize,
        offset: u64,
        width: u8,
        value: u64,
    ) -> Result<(), MmioError> {
        match offset {
            o if (GICR_VPROPBASER..GICR_VPROPBASER + 8).contains(&o) => {
                let pos = half64(GICR_VPROPBASER, o, width)?;
                if self.rds[pe].vpendbaser & VPENDBASER_VALID != 0 {
                    self.record(UnpredictableEvent::VpropbaserWhileResident { rd: pe });
                    return Ok(());
                }
                let v = merge_part(self.rds[pe].vpropbaser, value, pos, width);
                self.rds[pe].vpropbaser = v & VPROPBASER_V40_RW_MASK;
                Ok(())
            }
            o if (GICR_VPENDBASER..GICR_VPENDBASER + 8).contains(&o) => {
                let pos = half64(GICR_VPENDBASER, o, width)?;
                let old = self.rds[pe].vpendbaser;
                let new = merge_part(old, value, pos, width) & VPENDBASER_V40_RW_MASK;
                self.write_vpendbaser_v40(mem, pe, old, new);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// GICv4.0 residency. Valid 0 -> 1 makes the vPE whose VPT is at the written address
    /// resident (VConf and IDbits from VPROPBASER); PendingLast then reads 1. Valid 1 -> 0
    /// makes it non-resident; PendingLast reads back whether a vLPI was pending and enabled.
    fn write_vpendbaser_v40<M: GuestMem>(
        &mut self,
        mem: &mut LoggedMem<M>,
        pe: usize,
        old: u64,
        new: u64,
    ) {
        match (old & VPENDBASER_VALID != 0, new & VPENDBASER_VALID != 0) {
            (false, false) => self.rds[pe].vpendbaser = new,
            (true, true) => self.record(UnpredictableEvent::VpendbaserWhileValid { rd: pe }),
            (false, true) => {
                let vpt = new & VPENDBASER_V40_PA_MASK;
                let prop = self.rds[pe].vpropbaser;
                let vconf = prop & VPROPBASER_V40_PA_MASK;
                let found = self.vpes.values().find(|v| v.vpt == vpt).map(|v| v.vpeid);
                let rd = &mut self.rds[pe];
                rd.v40_resident = None;
                rd.v40_unmapped_pending = false;
                match found {
                    Some(vpeid)
                        if self
                            .vpes
                            .get(&vpeid)
                            .is_some_and(|v| v.resident_on.is_some()) =>
                    {
                        self.record(UnpredictableEvent::ResidentTwice { rd: pe, vpeid });
                        return;
                    }
                    Some(vpeid) => self.make_resident_v40(mem, pe, vpeid),
                    None => {
                        let bits = ((prop & VPROPBASER_V40_IDBITS_MASK) + 1) as u8;
                        self.rds[pe].v40_unmapped_pending =
                            tables_hold_pending(mem, vpt, vconf, bits);
                    }
                }
                self.rds[pe].vpendbaser = new | VPENDBASER_PENDING_LAST;
            }
            (true, false) => {
                let rd = &mut self.rds[pe];
                let pending = match rd.v40_resident.take() {
                    Some(id) => match self.vpes.get_mut(&id) {
                        Some(v) if v.resident_on == Some(pe) => {
                            v.resident_on = None;
                            v.has_deliverable([true, true])
                        }
                        _ => false,
                    },
                    None => std::mem::take(&mut rd.v40_unmapped_pending),
                };
                self.rds[pe].vpendbaser = (new & !VPENDBASER_PENDING_LAST)
                    | if pending { VPENDBASER_PENDING_LAST } else { 0 };
            }
        }
    }

    /// Makes `vpeid` resident on `pe` (GICv4.0): its VConf is the one VPROPBASER names there;
    /// the VPT and the configuration are parsed now.
    fn make_resident_v40<M: GuestMem>(&mut self, mem: &LoggedMem<M>, pe: usize, vpeid: u32) {
        let vconf = self.rds[pe].vpropbaser & VPROPBASER_V40_PA_MASK;
        if let Some(v) = self.vpes.get_mut(&vpeid) {
            v.resident_on = Some(pe);
            v.last_resident = Some(pe);
            v.db_armed = false;
            v.vgrp_en = [true, true];
            v.vconf = vconf;
        }
        self.load_vpt(mem, vpeid);
        self.reload_config(mem, vpeid);
        self.rds[pe].v40_resident = Some(vpeid);
    }

    /// GICv4.0 VMAPP of a vPE whose VPT a redistributor already holds resident (software
    /// may schedule a vPE before any ITS maps it): the vPE is resident there from now on.
    pub(crate) fn v40_attach<M: GuestMem>(&mut self, mem: &LoggedMem<M>, vpeid: u32) {
        let Some(vpt) = self
            .vpes
            .get(&vpeid)
            .filter(|v| v.resident_on.is_none())
            .map(|v| v.vpt)
        else {
            return;
        };
        let at = (0..self.rds.len()).find(|&pe| {
            let r = &self.rds[pe];
            r.vpendbaser & VPENDBASER_VALID != 0
                && r.vpendbaser & VPENDBASER_V40_PA_MASK == vpt
                && r.v40_resident
                    .map_or(true, |id| id == vpeid || !self.vpes.contains_key(&id))
        });
        if let Some(pe) = at {
            self.make_resident_v40(mem, pe, vpeid);
        }
    }

    /// GICv4.0: the vPE no ITS maps any more stops being resident where it was (the
    /// redistributor keeps the VPT address it was given).
    pub(crate) fn v40_detach(&mut self, vpeid: u32) {
        for rd in &mut self.rds {
            if rd.v40_resident == Some(vpeid) {
                rd.v40_resident = None;
            }
        }
    }
}

/// Whether the VPT at `vpt` holds a pending vLPI below `2^bits` that the VConf table at
/// `vconf` enables (what a GICv4.0 redistributor parses for a VPT no vPE maps).
fn tables_hold_pending<M: GuestMem>(mem: &LoggedMem<M>, vpt: u64, vconf: u64, bits: u8) -> bool {
    if !(14..=16).contains(&bits) {
        return false;
    }
    let first = LPI_BASE / 8;
    let end = (1u32 << bits) / 8;
    let mut buf = vec![0u8; (end - first) as usize];
    if mem.read(vpt + first as u64, &mut buf).is_err() {
        return false;
    }
    buf.iter().enumerate().any(|(i, &b)| {
        (0..8).any(|bit| {
            b & (1 << bit) != 0
                && mem
                    .read_u8(vconf + ((first + i as u32) * 8 + bit - LPI_BASE) as u64)
                    .is_ok_and(|c| c & LPI_PROP_ENABLE != 0)
        })
    })
}
