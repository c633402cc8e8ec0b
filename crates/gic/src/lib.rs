//! An executable, register-accurate model of an Arm GICv3 interrupt controller with its
//! Interrupt Translation Service (physical LPIs), written so that a driver written against the
//! architecture works against it unchanged: the same MMIO frames and offsets, the same command
//! queue in guest memory, the same tables in guest memory.
//!
//! Module map:
//! - [`config`]: [`GicConfig`], the PEs, frame bases and sizes (defaults: QEMU `virt`).
//! - [`regs`]: every register offset, bit field and table-format constant.
//! - [`mem`]: the [`GuestMem`] trait, [`VecMem`], the vm-memory adapter and the write log.
//! - `dist` (private): the distributor frame (SPIs, global enables).
//! - `redist` (private): redistributors (SGIs/PPIs, LPI tables, configuration cache).
//! - [`its`]: the ITS registers, command queue, tables and translation.
//! - [`cpuif`]: the per-PE CPU interface registers ([`IccReg`]).
//! - [`qtest`]: a QEMU-qtest-compatible line protocol front end.
//! - [`bench`](mod@bench): the model throughput benchmark.
//! - [`fuzz`]: the byte-string entry point shared by the fuzz target and its smoke test.
//!
//! Data flow: an MMIO write to GITS_CWRITER (or GITS_TRANSLATER) runs the ITS, which reads
//! its tables from guest memory and sets LPI pending state in a redistributor (written through
//! to the pending table); after every state change the model recomputes each PE's highest
//! priority pending interrupt and drives that PE's IRQ line ([`IrqLines`]; Group 0 drives the
//! FIQ line instead); software
//! acknowledges through [`Gic::icc_read`] (`ICC_IAR1_EL1`) and completes through
//! [`Gic::icc_write`] (`ICC_EOIR1_EL1` / `ICC_DIR_EL1`). Every guest-memory write the model
//! makes is recorded in its [`WriteLog`].
//!
//! ```
//! use gic::{Gic, GicConfig, IccReg, VecMem};
//! let mut gic = Gic::new(GicConfig::virt(2), VecMem::new(0x4000_0000, 1 << 20)).unwrap();
//! // Enable Group 1 in the distributor, make SGI 3 Group 1 and enabled on PE 1.
//! gic.write(0x0800_0000, 4, 0x2).unwrap();
//! let sgi_base = 0x080a_0000 + 0x20000 + 0x10000;
//! gic.write(sgi_base + 0x80, 4, 1 << 3).unwrap();
//! gic.write(sgi_base + 0x100, 4, 1 << 3).unwrap();
//! gic.icc_write(1, IccReg::Pmr, 0xff).unwrap();
//! gic.icc_write(1, IccReg::Igrpen1, 1).unwrap();
//! // PE 0 sends SGI 3 to PE 1 (Aff0 = 1).
//! gic.icc_write(0, IccReg::Sgi1r, (3 << 24) | 0b10).unwrap();
//! assert!(gic.irq_line(1));
//! assert_eq!(gic.icc_read(1, IccReg::Iar1).unwrap(), 3);
//! gic.icc_write(1, IccReg::Eoir1, 3).unwrap();
//! assert!(!gic.irq_line(1));
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod access;
pub mod bench;
pub mod config;
pub mod cpuif;
mod dist;
mod error;
pub mod fuzz;
pub mod ich;
pub mod its;
pub mod mem;
pub mod qtest;
mod qtest_args;
mod redist;
pub mod regs;
#[cfg(debug_assertions)]
mod selfcheck;
pub mod v41;
mod vcpuif;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use config::{GicConfig, GicVersion, ItsConfig, RedistRegion, V41Config};
pub use cpuif::{CpuIfState, IccReg};
pub use dist::DistState;
pub use error::{ConfigError, MemError, MmioError, StateError};
pub use ich::{IchReg, IchState};
pub use its::{ItsCommand, ItsCommandError, ItsErrorRecord, ItsErrorSource, ItsState};
pub use mem::{GuestMem, VecMem, VmMemory, WriteLog};
pub use qtest_args::QtestArgError;
pub use redist::RedistState;
pub use v41::{IcvState, RdV41State, UnpredictableEvent, V41State, V41Stats, VpeState};

use cpuif::{CpuIf, Group};
use dist::Distributor;
use its::{Its, ItsEnv};
use mem::LoggedMem;
use redist::Redistributor;
use regs::*;
use v41::V41;

/// A CPU-interface access the model rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum CpuIfError {
    /// The PE index is not configured.
    #[error("PE {0} does not exist")]
    NoSuchPe(usize),
    /// The register is write-only and was read, or read-only and was written.
    #[error("{reg:?} cannot be {op}")]
    Direction {
        /// The register.
        reg: IccReg,
        /// "read" or "written".
        op: &'static str,
    },
}

/// A GITS_TRANSLATER-equivalent request the model rejects before reaching an ITS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum MsiError {
    /// The ITS index is not configured.
    #[error("ITS {0} does not exist")]
    NoSuchIts(usize),
    /// The ITS dropped the request (also recorded in its error records).
    #[error("ITS dropped the request: {0}")]
    Dropped(#[from] ItsCommandError),
}

/// Version of the [`GicState`] layout written by this crate.
pub const GIC_STATE_VERSION: u32 = 1;

/// Saved state of the whole model (everything outside guest memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicState {
    /// Layout version ([`GIC_STATE_VERSION`]); restore refuses any other.
    pub version: u32,
    /// The configuration the model was built from.
    pub config: GicConfig,
    /// Distributor.
    pub dist: DistState,
    /// Redistributors, by PE index.
    pub redists: Vec<RedistState>,
    /// CPU interfaces, by PE index.
    pub cpus: Vec<CpuIfState>,
    /// ITSs, in configuration order.
    pub its: Vec<ItsState>,
    /// DeviceID used for GITS_TRANSLATER writes made through MMIO.
    pub msi_device_id: u32,
    /// GICv4.1 state (absent for a GICv3 configuration).
    #[serde(default)]
    pub v41: Option<V41State>,
    /// Per PE: the hypervisor's virtual CPU interface registers (ICH_*_EL2).
    #[serde(default)]
    pub ich: Vec<IchState>,
}

/// Callback told about every IRQ line change: `(PE index, new level)`.
pub type IrqHook = Box<dyn FnMut(usize, bool) + Send>;

/// Nothing changed for this PE.
const STALE_NONE: u8 = 0;
/// Only the CPU interface's masking changed (PMR, running priority): re-derive the lines.
const STALE_LINES: u8 = 1;
/// Something the highest priority pending interrupt depends on changed.
const STALE_HPPI: u8 = 2;

const LINE_IRQ: u8 = 1;
const LINE_FIQ: u8 = 2;

/// The IRQ (and FIQ) output lines of all PEs, shareable with threads that wait on them.
///
/// Levels are atomics, so reading a line and changing one take no lock; the mutex and
/// condition variable are used only while some thread waits in [`IrqLines::wait_for`].
#[derive(Debug, Default)]
pub struct IrqLines {
    /// Per PE: bit 0 the IRQ line, bit 1 the FIQ line.
    lines: Vec<AtomicU8>,
    lock: Mutex<()>,
    changed: Condvar,
    /// Threads blocked in [`IrqLines::wait_for`]: line changes notify only when nonzero (a
    /// condition variable's notify is a system call even with nobody waiting).
    waiters: AtomicUsize,
}

impl IrqLines {
    fn with_pes(n: usize) -> IrqLines {
        IrqLines {
            lines: (0..n).map(|_| AtomicU8::new(0)).collect(),
            ..IrqLines::default()
        }
    }

    /// Current level of PE `pe`'s IRQ line (false for an unknown PE).
    pub fn level(&self, pe: usize) -> bool {
        self.lines
            .get(pe)
            .is_some_and(|l| l.load(Ordering::SeqCst) & LINE_IRQ != 0)
    }

    /// Blocks until PE `pe`'s line has level `level` or `timeout` passes; returns whether
    /// the level was reached.
    pub fn wait_for(&self, pe: usize, level: bool, timeout: Duration) -> bool {
        // Registered before the level is checked under the lock: a setter that changes the
        // level after that check sees the waiter, takes the lock and notifies.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let guard = match self.lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let res = self
            .changed
            .wait_timeout_while(guard, timeout, |_| self.level(pe) != level);
        drop(res);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        self.level(pe) == level
    }

    /// Current level of PE `pe`'s FIQ line (Group 0; false for an unknown PE).
    pub fn fiq_level(&self, pe: usize) -> bool {
        self.lines
            .get(pe)
            .is_some_and(|l| l.load(Ordering::SeqCst) & LINE_FIQ != 0)
    }

    /// Sets one PE's lines and wakes waiters, if there are any.
    fn set(&self, pe: usize, irq: bool, fiq: bool) {
        if let Some(l) = self.lines.get(pe) {
            let v = if irq { LINE_IRQ } else { 0 } | if fiq { LINE_FIQ } else { 0 };
            l.store(v, Ordering::SeqCst);
        }
        if self.waiters.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this notify after a waiter's check-then-sleep.
            drop(match self.lock.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            });
            self.changed.notify_all();
        }
    }
}

/// A pending interrupt candidate for a PE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    intid: u32,
    prio: u8,
    group: Group,
}

/// The GICv3 model.
pub struct Gic<M> {
    cfg: GicConfig,
    mem: LoggedMem<M>,
    dist: Distributor,
    rds: Vec<Redistributor>,
    cpus: Vec<CpuIf>,
    its: Vec<Its>,
    aff_to_pe: BTreeMap<u32, usize>,
    levels: Vec<bool>,
    fiq_levels: Vec<bool>,
    lines: Arc<IrqLines>,
    irq_hook: Option<IrqHook>,
    msi_device_id: u32,
    v41: Option<V41>,
    /// Highest priority pending interrupt of each PE, as of the last `update`.
    hppi_cache: Vec<Option<Candidate>>,
    /// Per PE: what the next `update` must recompute ([`STALE_LINES`] or [`STALE_HPPI`]),
    /// besides every PE whose redistributor reports `touched`.
    stale: Vec<u8>,
    /// Every PE must be recomputed (distributor state, reset, restore).
    all_stale: bool,
    /// Running summary of the SPIs: per PE, the best pending, enabled, inactive SPI routed
    /// there, per group (`[Group 0, Group 1]`).
    spi_best: Vec<[Option<Candidate>; 2]>,
    /// SPI state changed: `spi_best` is rebuilt by the next `update`.
    spi_stale: bool,
    /// Per PE: ICH_*_EL2.
    ich: Vec<IchState>,
}

impl<M> std::fmt::Debug for Gic<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gic")
            .field("config", &self.cfg)
            .field("irq_levels", &self.levels)
            .finish_non_exhaustive()
    }
}

/// Which frame an address falls in.
enum Frame {
    Dist(u64),
    RdBase(usize, u64),
    SgiBase(usize, u64),
    VlpiBase(usize, u64),
    RdReserved,
    Its(usize, u64),
}

/// A virtual CPU interface register (`ICV_*_EL1`) of the vPE resident on a PE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IcvReg {
    /// ICV_IAR1_EL1 (RO): acknowledge the highest priority pending Group 1 virtual interrupt.
    Iar1,
    /// ICV_EOIR1_EL1 (WO): priority drop (vLPIs and vSGIs have no active state).
    Eoir1,
    /// ICV_HPPIR1_EL1 (RO).
    Hppir1,
    /// ICV_IAR0_EL1 (RO).
    Iar0,
    /// ICV_EOIR0_EL1 (WO).
    Eoir0,
    /// ICV_HPPIR0_EL1 (RO).
    Hppir0,
    /// ICV_PMR_EL1.
    Pmr,
    /// ICV_RPR_EL1 (RO).
    Rpr,
    /// ICV_CTLR_EL1 (PRIbits and A3V read-only, EOImode read/write).
    Ctlr,
    /// ICV_IGRPEN0_EL1.
    Igrpen0,
    /// ICV_IGRPEN1_EL1.
    Igrpen1,
    /// ICV_DIR_EL1 (WO): deactivate (with ICV_CTLR_EL1.EOImode = 1).
    Dir,
    /// ICV_BPR0_EL1.
    Bpr0,
    /// ICV_BPR1_EL1.
    Bpr1,
    /// ICV_AP0R0_EL1.
    Ap0r0,
    /// ICV_AP1R0_EL1.
    Ap1r0,
}

impl IcvReg {
    /// Parses a register name as used by the qtest front end (`iar1`, `eoir1`, ...).
    pub fn from_name(s: &str) -> Option<IcvReg> {
        Some(match s.to_ascii_lowercase().as_str() {
            "iar1" => IcvReg::Iar1,
            "eoir1" => IcvReg::Eoir1,
            "hppir1" => IcvReg::Hppir1,
            "iar0" => IcvReg::Iar0,
            "eoir0" => IcvReg::Eoir0,
            "hppir0" => IcvReg::Hppir0,
            "pmr" => IcvReg::Pmr,
            "rpr" => IcvReg::Rpr,
            "ctlr" => IcvReg::Ctlr,
            "igrpen0" => IcvReg::Igrpen0,
            "igrpen1" => IcvReg::Igrpen1,
            "dir" => IcvReg::Dir,
            "bpr0" => IcvReg::Bpr0,
            "bpr1" => IcvReg::Bpr1,
            "ap0r0" => IcvReg::Ap0r0,
            "ap1r0" => IcvReg::Ap1r0,
            _ => return None,
        })
    }
}

/// A virtual CPU interface access the model rejects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum VcpuError {
    /// The PE index is not configured.
    #[error("PE {0} does not exist")]
    NoSuchPe(usize),
    /// The GIC has no GICv4.1 configuration.
    #[error("the GIC is not configured for GICv4.1")]
    NotV41,
    /// No vPE is resident on the PE (no guest is running there).
    #[error("no vPE is resident on PE {0}")]
    NotResident(usize),
    /// The register is write-only and was read, or read-only and was written.
    #[error("{reg:?} cannot be {op}")]
    Direction {
        /// The register.
        reg: IcvReg,
        /// "read" or "written".
        op: &'static str,
    },
    /// The list register does not exist (ICH_VTR_EL2.ListRegs).
    #[error("ICH_LR{0}_EL2 is not implemented")]
    NoSuchLr(u8),
    /// A read-only ICH register was written.
    #[error("{0:?} is read-only")]
    IchReadOnly(IchReg),
}

impl<M: GuestMem> Gic<M> {
    /// Builds a model in its reset state.
    pub fn new(cfg: GicConfig, mem: M) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let n = cfg.num_pes();
        let v41 = cfg.v41.clone().map(|v| V41::new(v, &cfg.pe_affinities));
        let rds = Self::build_rds(&cfg, v41.as_ref());
        let aff_to_pe = cfg
            .pe_affinities
            .iter()
            .enumerate()
            .map(|(i, a)| (*a, i))
            .collect();
        let lines = Arc::new(IrqLines::with_pes(n));
        Ok(Gic {
            dist: Distributor::new(&cfg),
            rds,
            cpus: (0..n).map(|_| CpuIf::new()).collect(),
            its: Self::build_its(&cfg),
            aff_to_pe,
            v41,
            levels: vec![false; n],
            fiq_levels: vec![false; n],
            lines,
            irq_hook: None,
            msi_device_id: 0,
            hppi_cache: vec![None; n],
            stale: vec![STALE_NONE; n],
            all_stale: true,
            spi_best: vec![[None, None]; n],
            spi_stale: true,
            ich: vec![IchState::default(); n],
            mem: LoggedMem {
                mem,
                log: WriteLog::default(),
            },
            cfg,
        })
    }

    /// Returns every register, line and cache to its reset state (a system reset). Guest
    /// memory, the write log, the IRQ hook and the MSI DeviceID are kept; IRQ lines drop.
    pub fn reset(&mut self) {
        let cfg = &self.cfg;
        let n = cfg.num_pes();
        self.dist = Distributor::new(cfg);
        self.v41 = cfg.v41.clone().map(|v| V41::new(v, &cfg.pe_affinities));
        self.rds = Self::build_rds(cfg, self.v41.as_ref());
        self.cpus = (0..n).map(|_| CpuIf::new()).collect();
        self.its = Self::build_its(cfg);
        self.ich = vec![IchState::default(); n];
        self.all_stale = true;
        self.update();
    }

    fn build_rds(cfg: &GicConfig, v41: Option<&V41>) -> Vec<Redistributor> {
        let extra = v41.map_or(0, |v| v.typer_bits());
        cfg.pe_affinities
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let mut r = Redistributor::new(i, *a, cfg.rd_is_last(i), cfg.lpi_id_bits);
                r.add_typer_bits(extra);
                r
            })
            .collect()
    }

    fn build_its(cfg: &GicConfig) -> Vec<Its> {
        cfg.its
            .iter()
            .enumerate()
            .map(|(i, c)| Its::new(c.clone(), i, cfg.v41.clone()))
            .collect()
    }

    /// The configuration.
    pub fn config(&self) -> &GicConfig {
        &self.cfg
    }

    /// Guest memory.
    pub fn mem(&self) -> &M {
        &self.mem.mem
    }

    /// Guest memory, mutably (writes made through this are not logged: they are not the
    /// model's).
    pub fn mem_mut(&mut self) -> &mut M {
        &mut self.mem.mem
    }

    /// The log of guest-memory writes made by the model.
    pub fn write_log(&mut self) -> &mut WriteLog {
        &mut self.mem.log
    }

    /// The shared IRQ line object (clone the `Arc` to wait from another thread).
    pub fn irq_lines(&self) -> Arc<IrqLines> {
        // Lines are published only while someone else holds the object (see `update`):
        // bring it up to date before handing out the first clone.
        if Arc::strong_count(&self.lines) == 1 {
            for pe in 0..self.levels.len() {
                self.lines.set(pe, self.levels[pe], self.fiq_levels[pe]);
            }
        }
        Arc::clone(&self.lines)
    }

    /// Installs (or removes) a callback run on every IRQ line change.
    pub fn set_irq_hook(&mut self, hook: Option<IrqHook>) {
        self.irq_hook = hook;
    }

    /// Level of PE `pe`'s IRQ line (false for an unknown PE).
    pub fn irq_line(&self, pe: usize) -> bool {
        self.levels.get(pe).copied().unwrap_or(false)
    }

    /// Sets the DeviceID that GITS_TRANSLATER writes made through [`Gic::write`] carry
    /// (a real bus supplies it as sideband; QEMU's qtest accesses carry 0).
    pub fn set_msi_device_id(&mut self, device: u32) {
        self.msi_device_id = device;
    }

    /// Error records of ITS `its` (oldest first) and the total number ever recorded.
    pub fn its_errors(&self, its: usize) -> Option<(Vec<ItsErrorRecord>, u64)> {
        self.its
            .get(its)
            .map(|i| (i.errors().copied().collect(), i.error_count()))
    }

    /// Commands ITS `its` has executed so far.
    pub fn its_commands_processed(&self, its: usize) -> Option<u64> {
        self.its.get(its).map(|i| i.commands_processed())
    }

    fn decode(&self, addr: u64) -> Option<Frame> {
        if let Some(off) = addr.checked_sub(self.cfg.gicd_base) {
            if off < GICD_SIZE {
                return Some(Frame::Dist(off));
            }
        }
        if let Some((pe, inner)) = self.cfg.rd_at(addr) {
            return Some(if inner < GICR_SGI_OFFSET {
                Frame::RdBase(pe, inner)
            } else if inner < GICR_VLPI_OFFSET {
                Frame::SgiBase(pe, inner - GICR_SGI_OFFSET)
            } else if inner < GICR_VLPI_OFFSET + FRAME_SIZE {
                Frame::VlpiBase(pe, inner - GICR_VLPI_OFFSET)
            } else {
                Frame::RdReserved
            });
        }
        let its_size = self.cfg.its_size();
        for (i, its) in self.its.iter().enumerate() {
            if let Some(off) = addr.checked_sub(its.config().base) {
                if off < its_size {
                    return Some(Frame::Its(i, off));
                }
            }
        }
        None
    }

    fn check_access(addr: u64, width: u8) -> Result<(), MmioError> {
        if !matches!(width, 1 | 2 | 4 | 8) {
            return Err(MmioError::BadWidth { width });
        }
        if addr & (width as u64 - 1) != 0 {
            return Err(MmioError::Unaligned { addr, width });
        }
        Ok(())
    }

    /// A GICv4.1 (not GICv3, not GICv4.0): GICR_SYNCR busy tracking, V = 1 register
    /// invalidation and GITS_SGIR exist.
    fn is_v41(&self) -> bool {
        self.cfg.version() == GicVersion::V4_1
    }

    /// Whether `addr` is inside one of the model's register frames.
    pub fn claims(&self, addr: u64) -> bool {
        self.decode(addr).is_some()
    }

    /// An MMIO read of `width` bytes (1, 2, 4 or 8) at guest-physical `addr`.
    pub fn read(&self, addr: u64, width: u8) -> Result<u64, MmioError> {
        Self::check_access(addr, width)?;
        let frame = self.decode(addr).ok_or(MmioError::Unmapped { addr })?;
        match frame {
            Frame::Dist(PIDR2) | Frame::RdBase(_, PIDR2) | Frame::Its(_, PIDR2)
                if self.cfg.version() == GicVersion::V4_0 =>
            {
                access::only32(PIDR2, width).map(|_| PIDR2_VALUE_V4 as u64)
            }
            Frame::Dist(off) => self.dist.read(off, width),
            Frame::RdBase(pe, GICR_SYNCR) if self.is_v41() => {
                access::only32(GICR_SYNCR, width)?;
                Ok(self.v41.as_ref().map_or(0, |v| v.read_syncr(pe)))
            }
            Frame::RdBase(pe, off) => self.rds[pe].read_rd(off, width),
            Frame::SgiBase(pe, off) => self.rds[pe].read_sgi(off, width),
            Frame::VlpiBase(pe, off) => match &self.v41 {
                Some(v) => v.read_vlpi(pe, off, width),
                None => Ok(0),
            },
            Frame::RdReserved => Ok(0),
            Frame::Its(_, GITS_SGIR) if self.is_v41() => {
                if width == 8 || width == 4 {
                    Ok(0)
                } else {
                    Err(MmioError::WidthNotPermitted {
                        offset: GITS_SGIR,
                        width,
                    })
                }
            }
            Frame::Its(i, off) => self.its[i].read(off, width),
        }
    }

    /// An MMIO write of `width` bytes (1, 2, 4 or 8) of `value` at guest-physical `addr`.
    /// Bits of `value` above `width` are ignored.
    pub fn write(&mut self, addr: u64, width: u8, value: u64) -> Result<(), MmioError> {
        Self::check_access(addr, width)?;
        let value = if width == 8 {
            value
        } else {
            value & ((1u64 << (width as u32 * 8)) - 1)
        };
        let frame = self.decode(addr).ok_or(MmioError::Unmapped { addr })?;
        if matches!(frame, Frame::Dist(_)) {
            // SPIs may be routed to any PE; group enables gate every PE.
            self.all_stale = true;
        }
        let r = match frame {
            Frame::Dist(GICD_CTLR) if self.v41.is_some() && width == 4 => {
                let old = self.dist.ctlr;
                let enabled = old & (GICD_CTLR_ENABLE_G0 | GICD_CTLR_ENABLE_G1) != 0;
                let changed = (old ^ value as u32) & GICD_CTLR_NASSGIREQ != 0;
                let mut v = value;
                if changed && enabled {
                    if let Some(v4) = &self.v41 {
                        v4.record(UnpredictableEvent::NassgireqWhileEnabled);
                    }
                    v = (v & !(GICD_CTLR_NASSGIREQ as u64)) | (old & GICD_CTLR_NASSGIREQ) as u64;
                }
                self.dist.write(GICD_CTLR, width, v)
            }
            Frame::Dist(off) => self.dist.write(off, width, value),
            Frame::RdBase(pe, off)
                if self.is_v41()
                    && width == 8
                    && (off == GICR_INVLPIR || off == GICR_INVALLR)
                    && value & GICR_INV_V != 0 =>
            {
                if let Some(v4) = self.v41.as_mut() {
                    if let Some(vpeid) = v4.invalidate(&self.mem, pe, value, off == GICR_INVALLR) {
                        // A newly enabled vLPI may be what an armed doorbell waits for. A
                        // pending table that cannot be written drops the doorbell (nothing
                        // to report an MMIO write's side effect to).
                        let _ = v4.check_doorbell(&mut self.rds, &mut self.mem, vpeid);
                    }
                }
                Ok(())
            }
            Frame::RdBase(pe, off) => self.rds[pe].write_rd(&mut self.mem, off, width, value),
            Frame::SgiBase(pe, off) => self.rds[pe].write_sgi(off, width, value),
            Frame::VlpiBase(pe, off) => match self.v41.as_mut() {
                Some(v4) => v4.write_vlpi(&mut self.mem, pe, off, width, value),
                None => Ok(()),
            },
            Frame::RdReserved => Ok(()),
            Frame::Its(i, GITS_SGIR) if self.is_v41() => {
                if width != 8 {
                    Err(MmioError::WidthNotPermitted {
                        offset: GITS_SGIR,
                        width,
                    })
                } else {
                    let Gic {
                        its,
                        rds,
                        mem,
                        cfg,
                        v41,
                        ..
                    } = self;
                    // Errors are recorded by the ITS; the bus write itself succeeds.
                    let _ = its[i].sgir(
                        &mut ItsEnv {
                            rds,
                            mem,
                            gic: cfg,
                            v41: v41.as_mut(),
                        },
                        value,
                    );
                    Ok(())
                }
            }
            Frame::Its(i, GITS_TRANSLATER) => return self.write_translater(i, width, value),
            Frame::Its(i, off) => match self.its[i].write_reg(off, width, value) {
                Ok(true) => {
                    self.run_its(i);
                    Ok(())
                }
                Ok(false) => Ok(()),
                Err(e) => Err(e),
            },
        };
        self.update();
        r
    }

    /// A GITS_TRANSLATER write: an MSI from the DeviceID set by [`Gic::set_msi_device_id`].
    /// A physical LPI changes one redistributor, so only its PE is updated.
    fn write_translater(&mut self, its: usize, width: u8, value: u64) -> Result<(), MmioError> {
        if width != 2 && width != 4 {
            return Err(MmioError::WidthNotPermitted {
                offset: GITS_TRANSLATER,
                width,
            });
        }
        let dev = self.msi_device_id;
        // Errors are recorded by the ITS; the bus write itself succeeds.
        match self.translate_msi(its, dev, value as u32) {
            Ok(Some(pe)) => self.update_pe(pe),
            _ => self.update(),
        }
        Ok(())
    }

    fn run_its(&mut self, i: usize) {
        let Gic {
            its,
            rds,
            mem,
            cfg,
            v41,
            ..
        } = self;
        if let Some(its) = its.get_mut(i) {
            its.process(&mut ItsEnv {
                rds,
                mem,
                gic: cfg,
                v41: v41.as_mut(),
            });
        }
    }

    /// An MSI from `device` with `event` arriving at ITS `its` (what a GITS_TRANSLATER write
    /// carrying that DeviceID does).
    pub fn send_msi(&mut self, its: usize, device: u32, event: u32) -> Result<(), MsiError> {
        let r = self.translate_msi(its, device, event);
        match r {
            Ok(Some(pe)) => self.update_pe(pe),
            _ => self.update(),
        }
        r.map(drop)
    }

    /// [`Gic::send_msi`] without the update (for callers that end with their own). Returns
    /// the PE whose redistributor alone the MSI changed, if that is known (a physical LPI).
    fn translate_msi(
        &mut self,
        its: usize,
        device: u32,
        event: u32,
    ) -> Result<Option<usize>, MsiError> {
        let Gic {
            its: all,
            rds,
            mem,
            cfg,
            v41,
            ..
        } = self;
        let target = all.get_mut(its).ok_or(MsiError::NoSuchIts(its))?;
        let r = target.translate(
            &mut ItsEnv {
                rds,
                mem,
                gic: cfg,
                v41: v41.as_mut(),
            },
            device,
            event,
        );
        r.map_err(MsiError::from)
    }

    /// Sets the pending latch of an SPI (an edge on its input). Returns false (and does
    /// nothing) for an INTID that is not an implemented SPI.
    pub fn set_spi_pending(&mut self, intid: u32) -> bool {
        if !self.dist.is_spi(intid) {
            return false;
        }
        self.dist.set_pending(intid, true);
        self.mark_spi(intid);
        self.update();
        true
    }

    /// Drives the input line of SPI `intid`. For a level-sensitive SPI (GICD_ICFGR) the
    /// interrupt is pending while the line is high; for an edge-triggered one a rising edge
    /// sets the pending latch. Returns false (and does nothing) for an INTID that is not an
    /// implemented SPI.
    pub fn set_spi_level(&mut self, intid: u32, high: bool) -> bool {
        if !self.dist.is_spi(intid) {
            return false;
        }
        self.dist.set_level(intid, high);
        self.mark_spi(intid);
        self.update();
        true
    }

    /// Drives the input line of PPI `intid` (16..32) on PE `pe`, with the same semantics as
    /// [`Gic::set_spi_level`] (GICR_ICFGR1 selects the trigger). Returns false for an invalid
    /// PE or INTID.
    pub fn set_ppi_level(&mut self, pe: usize, intid: u32, high: bool) -> bool {
        if !(NUM_SGIS..NUM_PRIVATE).contains(&intid) {
            return false;
        }
        let Some(rd) = self.rds.get_mut(pe) else {
            return false;
        };
        rd.set_ppi_line(intid, high);
        self.update();
        true
    }

    /// Sets the pending latch of PPI `intid` (16..32) on PE `pe`. Returns false for an invalid
    /// PE or INTID.
    pub fn set_ppi_pending(&mut self, pe: usize, intid: u32) -> bool {
        if !(NUM_SGIS..NUM_PRIVATE).contains(&intid) {
            return false;
        }
        let Some(rd) = self.rds.get_mut(pe) else {
            return false;
        };
        rd.pending |= 1 << intid;
        rd.touched = true;
        self.update();
        true
    }

    /// Whether INTID `intid` is pending for PE `pe` (SPIs: anywhere; LPIs: at `pe`'s
    /// redistributor).
    pub fn is_pending(&self, pe: usize, intid: u32) -> bool {
        let Some(rd) = self.rds.get(pe) else {
            return false;
        };
        if intid < NUM_PRIVATE {
            rd.pending_word() & (1 << intid) != 0
        } else if intid >= LPI_BASE {
            rd.lpi_pending.contains(intid)
        } else {
            self.dist.is_pending(intid)
        }
    }

    /// Whether INTID `intid` is active for PE `pe` (SPIs: anywhere; LPIs have no active
    /// state).
    pub fn is_active(&self, pe: usize, intid: u32) -> bool {
        let Some(rd) = self.rds.get(pe) else {
            return false;
        };
        if intid < NUM_PRIVATE {
            rd.active & (1 << intid) != 0
        } else if intid >= LPI_BASE {
            false
        } else {
            self.dist.is_active(intid)
        }
    }

    /// Every pending LPI at PE `pe`'s redistributor, ascending (empty for an unknown PE).
    pub fn pending_lpis(&self, pe: usize) -> Vec<u32> {
        self.rds
            .get(pe)
            .map(|r| r.lpi_pending.iter().collect())
            .unwrap_or_default()
    }

    fn spi_target(&self, intid: u32) -> Option<usize> {
        self.aff_to_pe
            .get(&self.dist.route_affinity(intid))
            .copied()
    }

    /// Marks the SPI summary and the PE an SPI is routed to for recomputation.
    fn mark_spi(&mut self, intid: u32) {
        self.spi_stale = true;
        if let Some(pe) = self.spi_target(intid) {
            self.stale[pe] = STALE_HPPI;
        }
    }

    /// Rebuilds `spi_best` with one pass over the distributor (ties: lowest INTID).
    fn recompute_spis(&mut self) {
        let Gic {
            dist,
            aff_to_pe,
            spi_best,
            ..
        } = self;
        spi_best.iter_mut().for_each(|b| *b = [None, None]);
        for w in 1..dist.pending.len() {
            let mut bits = dist.pending_word(w) & dist.enable[w] & !dist.active[w];
            while bits != 0 {
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                let intid = w as u32 * 32 + i;
                let Some(&pe) = aff_to_pe.get(&dist.route_affinity(intid)) else {
                    continue;
                };
                let group = if dist.group[w] & (1 << i) != 0 {
                    Group::G1
                } else {
                    Group::G0
                };
                let prio = dist.priority[intid as usize];
                let slot = &mut spi_best[pe][(group == Group::G1) as usize];
                if slot.map_or(true, |b| prio < b.prio) {
                    *slot = Some(Candidate { intid, prio, group });
                }
            }
        }
    }

    /// Highest priority pending interrupt of PE `pe` as of the last [`Gic::update`] (every
    /// public entry point ends with one, so it is current between calls).
    fn hppi(&self, pe: usize) -> Option<Candidate> {
        self.hppi_cache.get(pe).copied().flatten()
    }

    /// Highest priority pending interrupt that can be forwarded to PE `pe`, among the groups
    /// enabled both in GICD_CTLR and at the PE's CPU interface (the redistributor knows the
    /// CPU interface's group enables). Ties go to the lowest INTID (the architecture leaves
    /// the choice IMPLEMENTATION DEFINED).
    fn compute_hppi(&self, pe: usize) -> Option<Candidate> {
        let cpu = &self.cpus[pe];
        let g0 = self.dist.ctlr & GICD_CTLR_ENABLE_G0 != 0 && cpu.group_enabled(Group::G0);
        let g1 = self.dist.ctlr & GICD_CTLR_ENABLE_G1 != 0 && cpu.group_enabled(Group::G1);
        if !g0 && !g1 {
            return None;
        }
        let rd = &self.rds[pe];
        // The best is the smallest (priority, INTID): SGIs/PPIs, SPIs and LPIs occupy
        // ascending INTID ranges, so within each source the first of equal priority wins.
        let mut best: Option<Candidate> = None;
        let better = |c: Candidate, best: Option<Candidate>| {
            best.map_or(true, |b| (c.prio, c.intid) < (b.prio, b.intid))
        };
        // Selects, from the IGROUPR0 bits, the private INTIDs whose group is enabled.
        let sel = (if g1 { rd.group } else { 0 }) | (if g0 { !rd.group } else { 0 });
        let mut bits = rd.pending_word() & rd.enable & !rd.active & sel;
        while bits != 0 {
            let i = bits.trailing_zeros();
            bits &= bits - 1;
            let prio = rd.priority[i as usize];
            if best.map_or(true, |b| prio < b.prio) {
                let group = if rd.group & (1 << i) != 0 {
                    Group::G1
                } else {
                    Group::G0
                };
                best = Some(Candidate {
                    intid: i,
                    prio,
                    group,
                });
            }
        }
        // SPIs from the running summary (the best per group).
        let [s0, s1] = self.spi_best[pe];
        for (c, enabled) in [(s0, g0), (s1, g1)] {
            match c {
                Some(c) if enabled && better(c, best) => best = Some(c),
                _ => {}
            }
        }
        // LPIs are always Group 1; the running summary keeps the best one first.
        if g1 && rd.enable_lpis {
            if let Some((prio, intid)) = rd.best_lpi() {
                let c = Candidate {
                    intid,
                    prio,
                    group: Group::G1,
                };
                if better(c, best) {
                    best = Some(c);
                }
            }
        }
        best
    }

    /// The IRQ (Group 1) and FIQ (Group 0) levels candidate `c` drives at PE `pe`: one look
    /// at the candidate, which can only be of one group.
    fn signalled_lines(&self, pe: usize, c: Option<Candidate>) -> (bool, bool) {
        match c {
            Some(c) if self.cpus[pe].can_signal(c.group, c.prio) => {
                (c.group == Group::G1, c.group == Group::G0)
            }
            _ => (false, false),
        }
    }

    /// Recomputes the highest priority pending interrupt and the IRQ and FIQ lines of every
    /// PE an access may have affected (its redistributor was touched, it was marked stale, or
    /// everything was) and reports line changes. Only masking changes (PMR, priority drop)
    /// re-derive the lines without recomputing the candidate.
    fn update(&mut self) {
        let all = std::mem::take(&mut self.all_stale);
        if std::mem::take(&mut self.spi_stale) || all {
            self.recompute_spis();
        }
        for pe in 0..self.levels.len() {
            // Read first and clear only what is set: most PEs are clean on most accesses.
            let touched = self.rds[pe].touched;
            let stale = self.stale[pe];
            if !all && !touched && stale == STALE_NONE {
                continue;
            }
            self.rds[pe].touched = false;
            self.stale[pe] = STALE_NONE;
            self.refresh(pe, all || touched || stale == STALE_HPPI);
        }
        #[cfg(debug_assertions)]
        self.check_fast_path();
    }

    /// [`Gic::update`] for an access that can only have changed PE `pe`'s own state (its
    /// redistributor, its CPU interface), when no SPI or global state changed: every other
    /// PE is clean, since every entry point ends with an update, so only `pe` is looked at.
    fn update_pe(&mut self, pe: usize) {
        if self.all_stale || self.spi_stale {
            self.update();
            return;
        }
        #[cfg(debug_assertions)]
        for other in (0..self.levels.len()).filter(|o| *o != pe) {
            assert!(
                !self.rds[other].touched && self.stale[other] == STALE_NONE,
                "PE {other} changed by an access update_pe({pe}) assumed private"
            );
        }
        let touched = std::mem::take(&mut self.rds[pe].touched);
        let stale = std::mem::take(&mut self.stale[pe]);
        if touched || stale != STALE_NONE {
            self.refresh(pe, touched || stale == STALE_HPPI);
        }
        #[cfg(debug_assertions)]
        self.check_fast_path();
    }

    /// Recomputes PE `pe`'s candidate (if `hppi`) and lines, and reports a line change.
    fn refresh(&mut self, pe: usize, hppi: bool) {
        let c = if hppi {
            let c = self.compute_hppi(pe);
            self.hppi_cache[pe] = c;
            c
        } else {
            self.hppi(pe)
        };
        let (irq, fiq) = self.signalled_lines(pe, c);
        if fiq == self.fiq_levels[pe] && irq == self.levels[pe] {
            return;
        }
        self.fiq_levels[pe] = fiq;
        if irq != self.levels[pe] {
            self.levels[pe] = irq;
            if let Some(h) = self.irq_hook.as_mut() {
                h(pe, irq);
            }
        }
        // Nobody else can read the shared lines unless they hold a clone, which only
        // `irq_lines` hands out (after publishing every level): skip the atomic store,
        // a full barrier on x86, when nobody can look.
        if Arc::strong_count(&self.lines) > 1 {
            self.lines.set(pe, irq, fiq);
        }
    }

    /// Level of PE `pe`'s FIQ line (Group 0 interrupts; false for an unknown PE).
    pub fn fiq_line(&self, pe: usize) -> bool {
        self.fiq_levels.get(pe).copied().unwrap_or(false)
    }

    /// Reads an ICC system register of PE `pe`. Reading ICC_IAR0/1_EL1 acknowledges.
    pub fn icc_read(&mut self, pe: usize, reg: IccReg) -> Result<u64, CpuIfError> {
        if pe >= self.cpus.len() {
            return Err(CpuIfError::NoSuchPe(pe));
        }
        let hppir = |gic: &Self, group: Group| match gic.hppi(pe) {
            Some(c) if c.group == group => c.intid as u64,
            _ => INTID_SPURIOUS as u64,
        };
        let v = match reg {
            IccReg::Iar1 | IccReg::Iar0 => {
                let group = if reg == IccReg::Iar0 {
                    Group::G0
                } else {
                    Group::G1
                };
                let v = self.acknowledge(pe, group) as u64;
                self.stale[pe] = STALE_HPPI;
                // An acknowledged SPI marks the SPI summary stale: then every PE is looked at.
                self.update_pe(pe);
                v
            }
            IccReg::Hppir1 => hppir(self, Group::G1),
            IccReg::Hppir0 => hppir(self, Group::G0),
            IccReg::Rpr => self.cpus[pe].running_priority() as u64,
            IccReg::Pmr => self.cpus[pe].pmr as u64,
            IccReg::Bpr1 => self.cpus[pe].bpr1 as u64,
            IccReg::Bpr0 => self.cpus[pe].bpr0 as u64,
            IccReg::Ctlr => self.cpus[pe].ctlr(),
            IccReg::Igrpen1 => self.cpus[pe].igrpen1 as u64,
            IccReg::Igrpen0 => self.cpus[pe].igrpen0 as u64,
            IccReg::Ap1r0 => self.cpus[pe].ap1r0 as u64,
            IccReg::Ap0r0 => self.cpus[pe].ap0r0 as u64,
            IccReg::Eoir1 | IccReg::Eoir0 | IccReg::Dir | IccReg::Sgi1r | IccReg::Sgi0r => {
                return Err(CpuIfError::Direction { reg, op: "read" })
            }
        };
        Ok(v)
    }

    /// Writes an ICC system register of PE `pe`.
    pub fn icc_write(&mut self, pe: usize, reg: IccReg, value: u64) -> Result<(), CpuIfError> {
        if pe >= self.cpus.len() {
            return Err(CpuIfError::NoSuchPe(pe));
        }
        let intid = value as u32 & 0xFF_FFFF;
        match reg {
            IccReg::Eoir1 => self.end_of_interrupt(pe, intid, Group::G1),
            IccReg::Eoir0 => self.end_of_interrupt(pe, intid, Group::G0),
            IccReg::Dir => {
                // DIR with EOImode = 0 is UNPREDICTABLE: the model ignores it.
                if self.cpus[pe].eoimode {
                    self.deactivate(pe, intid);
                }
            }
            IccReg::Pmr => self.cpus[pe].pmr = value as u8 & PRIORITY_MASK,
            IccReg::Bpr1 => self.cpus[pe].set_bpr1(value),
            IccReg::Bpr0 => self.cpus[pe].set_bpr0(value),
            IccReg::Ctlr => self.cpus[pe].set_ctlr(value),
            IccReg::Igrpen1 => self.cpus[pe].igrpen1 = value & 1 != 0,
            IccReg::Igrpen0 => self.cpus[pe].igrpen0 = value & 1 != 0,
            IccReg::Ap1r0 => self.cpus[pe].ap1r0 = value as u32,
            IccReg::Ap0r0 => self.cpus[pe].ap0r0 = value as u32,
            IccReg::Sgi1r => self.generate_sgi(pe, value, true),
            IccReg::Sgi0r => self.generate_sgi(pe, value, false),
            IccReg::Iar1 | IccReg::Iar0 | IccReg::Hppir1 | IccReg::Hppir0 | IccReg::Rpr => {
                return Err(CpuIfError::Direction { reg, op: "written" })
            }
        }
        // The highest priority pending interrupt depends on the group enables and on the
        // active state of SGIs/PPIs (SPIs are marked by `deactivate`); the rest only masks.
        let hppi_input = match reg {
            IccReg::Igrpen0 | IccReg::Igrpen1 => true,
            IccReg::Eoir0 | IccReg::Eoir1 | IccReg::Dir => intid < NUM_PRIVATE,
            _ => false,
        };
        let need = if hppi_input { STALE_HPPI } else { STALE_LINES };
        self.stale[pe] = self.stale[pe].max(need);
        if matches!(reg, IccReg::Sgi1r | IccReg::Sgi0r) {
            // SGIs reach other PEs' redistributors.
            self.update();
        } else {
            // A deactivated SPI marks the SPI summary stale: then every PE is looked at.
            self.update_pe(pe);
        }
        Ok(())
    }

    /// ICC_IAR0/1_EL1: acknowledges the highest priority pending interrupt if it belongs to
    /// `group` and may be signalled; 1023 otherwise (also when a higher priority interrupt of
    /// the other group is pending).
    fn acknowledge(&mut self, pe: usize, group: Group) -> u32 {
        let Some(c) = self.hppi(pe) else {
            return INTID_SPURIOUS;
        };
        if c.group != group || !self.cpus[pe].can_signal(group, c.prio) {
            return INTID_SPURIOUS;
        }
        if c.intid < NUM_PRIVATE {
            let nassgi = self.dist.ctlr & GICD_CTLR_NASSGIREQ != 0;
            let rd = &mut self.rds[pe];
            rd.pending &= !(1 << c.intid);
            // With nASSGIreq, SGIs have no active state.
            if !(nassgi && c.intid < NUM_SGIS) {
                rd.active |= 1 << c.intid;
            }
        } else if c.intid >= LPI_BASE {
            // LPIs have no active state: acknowledging only clears pending. If the pending
            // table cannot be written the LPI stays pending and the acknowledge fails.
            match self.rds[pe].set_lpi_pending(&mut self.mem, c.intid, false) {
                Ok(true) => {}
                _ => return INTID_SPURIOUS,
            }
        } else {
            self.dist.set_pending(c.intid, false);
            self.dist.set_active(c.intid, true);
            self.spi_stale = true;
        }
        self.cpus[pe].activate_priority(group, c.prio);
        c.intid
    }

    fn end_of_interrupt(&mut self, pe: usize, intid: u32, group: Group) {
        if (INTID_SPECIAL_FIRST..=INTID_SPURIOUS).contains(&intid) {
            return;
        }
        // EOI with no active priority of this group (or when the other group holds the
        // highest active priority) is UNPREDICTABLE: the model ignores it entirely.
        if !self.cpus[pe].drop_priority(group) {
            return;
        }
        if !self.cpus[pe].eoimode {
            self.deactivate(pe, intid);
        }
    }

    fn deactivate(&mut self, pe: usize, intid: u32) {
        if intid < NUM_PRIVATE {
            self.rds[pe].active &= !(1 << intid);
        } else if intid < self.dist.num_irqs() {
            self.dist.set_active(intid, false);
            // The SPI may have been re-routed since it was acknowledged.
            self.mark_spi(intid);
        }
    }

    /// ICC_SGI0R_EL1 (`group1_allowed` false) / ICC_SGI1R_EL1 (true). With a single security
    /// state, SGI1R makes the SGI pending whatever its group at the target, while SGI0R only
    /// reaches targets where that SGI is Group 0 (the reading KVM's vGIC also implements).
    fn generate_sgi(&mut self, sender: usize, value: u64, group1_allowed: bool) {
        let intid = ((value >> ICC_SGI1R_INTID_SHIFT) & 0xF) as u32;
        let deliver = |rd: &mut Redistributor| {
            if group1_allowed || rd.group & (1 << intid) == 0 {
                rd.pending |= 1 << intid;
                rd.touched = true;
            }
        };
        if value & ICC_SGI1R_IRM != 0 {
            for (pe, rd) in self.rds.iter_mut().enumerate() {
                if pe != sender {
                    deliver(rd);
                }
            }
            return;
        }
        let aff3 = ((value >> ICC_SGI1R_AFF3_SHIFT) & 0xFF) as u32;
        let aff2 = ((value >> ICC_SGI1R_AFF2_SHIFT) & 0xFF) as u32;
        let aff1 = ((value >> ICC_SGI1R_AFF1_SHIFT) & 0xFF) as u32;
        let rs = ((value >> ICC_SGI1R_RS_SHIFT) & 0xF) as u32;
        let list = (value & ICC_SGI1R_TARGETLIST_MASK) as u32;
        for b in 0..16 {
            if list & (1 << b) == 0 {
                continue;
            }
            let aff0 = rs * 16 + b;
            if aff0 > 0xFF {
                continue;
            }
            let aff = (aff3 << 24) | (aff2 << 16) | (aff1 << 8) | aff0;
            if let Some(&pe) = self.aff_to_pe.get(&aff) {
                deliver(&mut self.rds[pe]);
            }
        }
    }

    /// vPEID resident on PE `pe` (GICR_VPENDBASER.Valid), if any.
    pub fn resident_vpe(&self, pe: usize) -> Option<u32> {
        self.v41.as_ref().and_then(|v| v.resident_vpeid(pe))
    }

    /// What the GIC knows about vPE `vpeid` (None if not allocated or no GICv4.1).
    pub fn vpe(&self, vpeid: u32) -> Option<&VpeState> {
        self.v41.as_ref().and_then(|v| v.vpes.get(&vpeid))
    }

    /// GICv4.1 activity counters (None without GICv4.1).
    pub fn v41_stats(&self) -> Option<V41Stats> {
        self.v41.as_ref().map(|v| v.stats())
    }

    /// CONSTRAINED UNPREDICTABLE situations recorded so far (oldest first, at most
    /// [`v41::UNPREDICTABLE_RECORDS`]) and the total ever recorded.
    pub fn unpredictable_events(&self) -> (Vec<UnpredictableEvent>, u64) {
        self.v41.as_ref().map_or((Vec::new(), 0), |v| v.events())
    }

    /// Saves the model's state (guest memory is not included: the tables and command queue
    /// live there and travel with it).
    pub fn state(&self) -> GicState {
        GicState {
            version: GIC_STATE_VERSION,
            config: self.cfg.clone(),
            dist: self.dist.state(),
            redists: self.rds.iter().map(|r| r.state()).collect(),
            cpus: self.cpus.iter().map(|c| c.state()).collect(),
            its: self.its.iter().map(|i| i.state()).collect(),
            msi_device_id: self.msi_device_id,
            v41: self.v41.as_ref().map(|v| v.state()),
            ich: self.ich.clone(),
        }
    }

    /// Rebuilds a model from a saved state over `mem` (which must hold the guest memory the
    /// state was saved with).
    pub fn from_state(state: &GicState, mem: M) -> Result<Self, StateError> {
        if state.version != GIC_STATE_VERSION {
            return Err(StateError::Version {
                got: state.version,
                want: GIC_STATE_VERSION,
            });
        }
        let mut gic = Gic::new(state.config.clone(), mem)?;
        let n = gic.cfg.num_pes();
        for (what, got, want) in [
            ("redistributor states", state.redists.len(), n),
            ("CPU interface states", state.cpus.len(), n),
            ("ITS states", state.its.len(), gic.its.len()),
        ] {
            if got != want {
                return Err(StateError::Length { what, got, want });
            }
        }
        gic.dist.restore(&state.dist)?;
        for (r, s) in gic.rds.iter_mut().zip(&state.redists) {
            r.restore(s)?;
        }
        for (c, s) in gic.cpus.iter_mut().zip(&state.cpus) {
            c.restore(s);
        }
        for (i, s) in gic.its.iter_mut().zip(&state.its) {
            i.restore(s)?;
        }
        gic.msi_device_id = state.msi_device_id;
        if !state.ich.is_empty() {
            if state.ich.len() != n {
                return Err(StateError::Length {
                    what: "ICH states",
                    got: state.ich.len(),
                    want: n,
                });
            }
            gic.ich = state.ich.clone();
        }
        gic.all_stale = true;
        match (gic.v41.as_mut(), &state.v41) {
            (Some(v), Some(s)) => v.restore(s)?,
            (None, None) | (Some(_), None) => {}
            (None, Some(_)) => {
                return Err(StateError::Length {
                    what: "GICv4.1 states",
                    got: 1,
                    want: 0,
                })
            }
        }
        gic.update();
        Ok(gic)
    }
}
