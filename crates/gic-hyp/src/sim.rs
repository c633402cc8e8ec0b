//! `gic-sim`: a VM of N vCPUs scheduled over M physical CPUs, with a workload of IPIs,
//! device MSIs and vCPUs blocking in WFI, run against the model through the driver in three
//! delivery modes:
//!
//! - [`SimMode::V3`]: GICv3 style, everything software-emulated: MSIs arrive as host LPIs,
//!   IPIs and MSIs are injected by the hypervisor (a kick, i.e. an exit, when the target
//!   runs elsewhere), WFI always traps.
//! - [`SimMode::V40`]: GICv4.0 style: device MSIs are direct vLPIs with a per-vLPI doorbell,
//!   IPIs stay software-emulated.
//! - [`SimMode::V41`]: GICv4.1: direct vLPIs and vSGIs (the sender still traps on
//!   ICC_SGI1R, the receiver does not), one default doorbell per vPE requested only when the
//!   vCPU blocks.
//!
//! The scheduler is a global run queue with fixed time slices; pCPUs are split into clusters
//! whose redistributors share a vPE table (CommonLPIAff), so migrations inside a cluster need
//! no VMOVP. Everything is deterministic given [`SimParams::seed`].
//!
//! Checks: every interrupt sent is delivered exactly once (the workload never re-sends an
//! interrupt that is still outstanding, so hardware merging cannot hide a loss), and for
//! GICv4.1, no vPE got more than one default doorbell in one non-residency phase.
//!
//! "Without hypervisor" counts interrupts sent while the target vCPU was loaded and taken
//! through the virtual CPU interface: nothing on the receiving side ran in the hypervisor.

//!
//! ```
//! use gic_hyp::sim::{self, SimParams};
//! let r = sim::run(&SimParams { ticks: 500, ..SimParams::default() }).unwrap();
//! assert!(r.ok());
//! println!("{}", r.to_markdown());
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;

use gic::regs::*;
use gic::{GicConfig, IcvReg, V41Config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::host::{Host, HostParams};
use crate::vcpuif::VcpuIf;
use crate::vgic::VGic;
use crate::vm::{DoorbellStyle, Vm, VmParams};
use crate::HypError;

/// Interrupt delivery mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SimMode {
    /// GICv3: software-emulated SGIs and LPIs.
    #[serde(rename = "v3")]
    V3,
    /// GICv4.0 style: direct vLPIs with per-vLPI doorbells, software SGIs.
    #[serde(rename = "v4.0")]
    V40,
    /// GICv4.1: direct vLPIs and vSGIs, per-vPE doorbells.
    #[serde(rename = "v4.1")]
    V41,
}

impl SimMode {
    /// The name `--modes` takes and JSON output uses (`v3`, `v4.0`, `v4.1`).
    pub fn name(self) -> &'static str {
        match self {
            SimMode::V3 => "v3",
            SimMode::V40 => "v4.0",
            SimMode::V41 => "v4.1",
        }
    }

    /// Short label used in tables.
    pub fn label(self) -> &'static str {
        match self {
            SimMode::V3 => "GICv3 (software)",
            SimMode::V40 => "GICv4.0-style",
            SimMode::V41 => "GICv4.1",
        }
    }
}

impl std::str::FromStr for SimMode {
    type Err = SimError;

    /// Parses `v3`, `v40` / `v4.0` or `v41` / `v4.1` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, SimError> {
        match s.to_ascii_lowercase().as_str() {
            "v3" | "gicv3" => Ok(SimMode::V3),
            "v40" | "v4.0" | "gicv4.0" => Ok(SimMode::V40),
            "v41" | "v4.1" | "gicv4.1" => Ok(SimMode::V41),
            _ => Err(SimError::Params("mode must be v3, v4.0 or v4.1")),
        }
    }
}

/// Simulation parameters. `Default` is the configuration `BENCHMARKS.md` reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimParams {
    /// vCPUs (default 8).
    pub vcpus: usize,
    /// Physical CPUs (default 4).
    pub pcpus: usize,
    /// pCPU clusters; redistributors of one cluster share a vPE table (default 2).
    pub clusters: usize,
    /// Ticks with traffic (default 20 000); a drain phase follows until everything is
    /// delivered (at most `ticks` more).
    pub ticks: u64,
    /// Time slice in ticks (default 40).
    pub slice: u64,
    /// Per running vCPU per tick: probability of sending an IPI (default 0.02).
    pub ipi_prob: f64,
    /// Per vCPU per tick: probability its device raises an MSI (default 0.005).
    pub msi_prob: f64,
    /// Per running vCPU with nothing pending per tick: probability of WFI (default 0.05).
    pub wfi_prob: f64,
    /// MSI events per device (one device per vCPU; default 8).
    pub events: u32,
    /// RNG seed (default 1).
    pub seed: u64,
    /// Modes to run (default all three).
    pub modes: Vec<SimMode>,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            vcpus: 8,
            pcpus: 4,
            clusters: 2,
            ticks: 20_000,
            slice: 40,
            ipi_prob: 0.02,
            msi_prob: 0.005,
            wfi_prob: 0.05,
            events: 8,
            seed: 1,
            modes: vec![SimMode::V3, SimMode::V40, SimMode::V41],
        }
    }
}

/// Results of one mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModeReport {
    /// The mode.
    pub mode: Option<SimMode>,
    /// IPIs sent.
    pub ipis: u64,
    /// MSIs sent.
    pub msis: u64,
    /// Interrupts the guest took.
    pub delivered: u64,
    /// Of those, delivered without the hypervisor on the receiving side (direct vLPI/vSGI
    /// through the virtual CPU interface to a resident vPE).
    pub direct: u64,
    /// Sends skipped because every interrupt ID for that target was still outstanding (the
    /// workload never re-sends an undelivered interrupt, so exactly-once is exact).
    pub suppressed: u64,
    /// Hypervisor exits (traps, kicks, host interrupts while a guest ran).
    pub exits: u64,
    /// Exits caused by IPIs (sender trap + receiver kick).
    pub ipi_exits: u64,
    /// WFIs that trapped.
    pub wfi_traps: u64,
    /// WFIs that did not trap (vCPU stayed resident).
    pub wfi_resident: u64,
    /// Doorbells the GIC raised (default doorbells in GICv4.1, individual ones in 4.0).
    pub doorbells: u64,
    /// Largest number of doorbells one vPE got in one non-residency phase.
    pub max_doorbells_per_phase: u64,
    /// Non-residency phases with more than one doorbell.
    pub phases_with_repeat_doorbells: u64,
    /// vCPU migrations between pCPUs.
    pub migrations: u64,
    /// VMOVP commands issued.
    pub vmovps: u64,
    /// Migrations that needed no VMOVP (shared vPE table).
    pub vmovps_skipped: u64,
    /// Interrupts sent and never delivered.
    pub lost: u64,
    /// Deliveries without an outstanding send.
    pub duplicated: u64,
    /// CONSTRAINED UNPREDICTABLE events the model recorded (must be 0).
    pub unpredictable: u64,
    /// Ticks including the drain phase.
    pub ticks_run: u64,
}

impl ModeReport {
    /// Exits per IPI sent.
    pub fn exits_per_ipi(&self) -> f64 {
        if self.ipis == 0 {
            0.0
        } else {
            self.ipi_exits as f64 / self.ipis as f64
        }
    }

    /// Whether the lost/duplicate and doorbell checks pass.
    pub fn ok(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unpredictable == 0
            && (self.mode != Some(SimMode::V41) || self.max_doorbells_per_phase <= 1)
    }
}

/// Results of a simulation run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    /// Parameters used.
    pub params: SimParams,
    /// One entry per mode, in the order asked.
    pub modes: Vec<ModeReport>,
}

impl SimReport {
    /// Whether every mode passed its checks.
    pub fn ok(&self) -> bool {
        self.modes.iter().all(|m| m.ok())
    }

    /// A markdown table, one row per mode.
    pub fn to_markdown(&self) -> String {
        let p = &self.params;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} vCPUs on {} pCPUs ({} clusters), {} ticks, slice {}, IPI p={}, MSI p={}, WFI p={}, seed {}\n",
            p.vcpus, p.pcpus, p.clusters, p.ticks, p.slice, p.ipi_prob, p.msi_prob, p.wfi_prob, p.seed
        );
        s.push_str(
            "| mode | IPIs | MSIs | delivered | without hypervisor | exits | exits/IPI | WFI traps | doorbells | max doorbells/phase | VMOVPs (skipped) | lost | duplicated |\n",
        );
        s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for m in &self.modes {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} ({:.1}%) | {} | {:.2} | {} | {} | {} | {} ({}) | {} | {} |",
                m.mode.map_or("?", |x| x.label()),
                m.ipis,
                m.msis,
                m.delivered,
                m.direct,
                if m.delivered == 0 {
                    0.0
                } else {
                    100.0 * m.direct as f64 / m.delivered as f64
                },
                m.exits,
                m.exits_per_ipi(),
                m.wfi_traps,
                m.doorbells,
                m.max_doorbells_per_phase,
                m.vmovps,
                m.vmovps_skipped,
                m.lost,
                m.duplicated
            );
        }
        s
    }
}

/// Why a simulation could not run.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SimError {
    /// A parameter is out of range.
    #[error("invalid simulation parameter: {0}")]
    Params(&'static str),
    /// The driver failed.
    #[error("driver error: {0}")]
    Hyp(#[from] HypError),
}

/// Runs every mode in `p.modes`.
pub fn run(p: &SimParams) -> Result<SimReport, SimError> {
    validate(p)?;
    let mut modes = Vec::new();
    for &m in &p.modes {
        modes.push(Sim::new(p, m)?.run()?);
    }
    Ok(SimReport {
        params: p.clone(),
        modes,
    })
}

fn validate(p: &SimParams) -> Result<(), SimError> {
    if p.vcpus == 0 || p.vcpus > 64 {
        return Err(SimError::Params("vcpus must be 1..=64"));
    }
    if p.pcpus == 0 || p.pcpus > 64 {
        return Err(SimError::Params("pcpus must be 1..=64"));
    }
    if p.clusters == 0 || p.clusters > p.pcpus {
        return Err(SimError::Params("clusters must be 1..=pcpus"));
    }
    if p.slice == 0 {
        return Err(SimError::Params("slice must be at least 1"));
    }
    if p.events == 0 || p.events > 64 {
        return Err(SimError::Params("events must be 1..=64"));
    }
    for x in [p.ipi_prob, p.msi_prob, p.wfi_prob] {
        if !(0.0..=1.0).contains(&x) {
            return Err(SimError::Params("probabilities must be in [0, 1]"));
        }
    }
    if p.ticks > 10_000_000 {
        return Err(SimError::Params("ticks must be at most 10 000 000"));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VState {
    Runnable,
    Running(usize),
    /// In WFI that did not trap: still loaded on the pCPU.
    Idle(usize),
    Blocked,
}

struct Sim {
    p: SimParams,
    mode: SimMode,
    rng: StdRng,
    host: Arc<Host>,
    vgic: Option<VGic>,
    state: Vec<VState>,
    cur: Vec<Option<usize>>,
    slice_left: Vec<u64>,
    runq: VecDeque<usize>,
    last_pcpu: Vec<Option<usize>>,
    /// GICv3 mode: each vCPU's virtual CPU interface context. The hypervisor injects
    /// emulated interrupts (SGI numbers below 16, vINTIDs for MSIs) through list registers,
    /// saved and restored on every exit and entry (a migration when the pCPU changes).
    vif: Vec<VcpuIf>,
    /// Outstanding interrupts per vCPU (SGI number or vINTID), with whether the target was
    /// loaded when it was sent.
    outstanding: Vec<BTreeMap<u32, bool>>,
    /// Host LPI -> (vCPU, event) for GICv3 device interrupts.
    host_lpis: BTreeMap<u32, (usize, u32)>,
    /// Model doorbell counter of each vPE when its current non-residency phase began.
    phase_start: Vec<u64>,
    icv_ready: Vec<bool>,
    r: ModeReport,
}

const VINTID_BASE: u32 = LPI_BASE;

impl Sim {
    fn new(p: &SimParams, mode: SimMode) -> Result<Sim, SimError> {
        let per = p.pcpus.div_ceil(p.clusters);
        let mut cfg = GicConfig::virt_v41(p.pcpus, 1);
        cfg.pe_affinities = (0..p.pcpus)
            .map(|i| (((i / per) as u32) << 8) | (i % per) as u32)
            .collect();
        cfg.v41 = Some(V41Config {
            common_lpi_aff: 3,
            svpet: 3,
            vpeid_bits: 10,
            ..V41Config::default()
        });
        let host = Arc::new(Host::boot(HostParams {
            gic: cfg,
            ram_size: 16 << 20,
            ..HostParams::default()
        })?);
        let n = p.vcpus;
        let mut sim = Sim {
            p: p.clone(),
            mode,
            rng: StdRng::seed_from_u64(p.seed),
            host: Arc::clone(&host),
            vgic: None,
            state: vec![VState::Runnable; n],
            cur: vec![None; p.pcpus],
            slice_left: vec![0; p.pcpus],
            runq: (0..n).collect(),
            last_pcpu: vec![None; n],
            vif: vec![VcpuIf::new(); n],
            outstanding: vec![BTreeMap::new(); n],
            host_lpis: BTreeMap::new(),
            phase_start: vec![0; n],
            icv_ready: vec![false; n],
            r: ModeReport {
                mode: Some(mode),
                ..ModeReport::default()
            },
        };
        // One device per vCPU, first owned by the host (host LPI on the vCPU's home pCPU).
        let events = p.events;
        let ebits = 32 - (events - 1).leading_zeros().min(31);
        let lpis = host.alloc_lpis(n as u32 * events)?;
        for v in 0..n {
            host.map_device(0, v as u32 + 1, ebits.max(1) as u8)?;
            for e in 0..events {
                let lpi = lpis + v as u32 * events + e;
                host.map_host_lpi(0, v as u32 + 1, e, lpi, v % p.pcpus)?;
                sim.host_lpis.insert(lpi, (v, e));
            }
        }
        if mode == SimMode::V3 {
            // The host takes the list registers' maintenance interrupt (PPI 25).
            let mut g = host.gic();
            for pe in 0..p.pcpus {
                let sgi = g.config().rd_base(pe) + GICR_SGI_OFFSET;
                let grp = g.read(sgi + GICR_IGROUPR0, 4).map_err(|e| HypError::Mmio {
                    addr: sgi + GICR_IGROUPR0,
                    source: e,
                })?;
                for (off, v) in [
                    (GICR_IGROUPR0, grp | 1 << ICH_MAINTENANCE_PPI),
                    (GICR_ISENABLER0, 1 << ICH_MAINTENANCE_PPI),
                ] {
                    g.write(sgi + off, 4, v).map_err(|e| HypError::Mmio {
                        addr: sgi + off,
                        source: e,
                    })?;
                }
            }
        }
        if mode != SimMode::V3 {
            let vm = Vm::create(
                Arc::clone(&host),
                VmParams {
                    vcpus: n,
                    vlpi_bits: 14,
                    doorbells: if mode == SimMode::V41 {
                        DoorbellStyle::PerVpe
                    } else {
                        DoorbellStyle::PerVlpi
                    },
                },
            )?;
            let vgic = VGic::new(vm, true);
            for v in 0..n {
                vgic.sgi_write(v, GICR_IGROUPR0, 0xFFFF)?;
                vgic.sgi_write(v, GICR_ISENABLER0, 0xFFFF)?;
                vgic.sgi_write(v, GICR_IPRIORITYR, 0x8080_8080)?;
                for e in 0..events {
                    vgic.vm().map_vlpi(
                        v,
                        0,
                        v as u32 + 1,
                        e,
                        VINTID_BASE + e,
                        lpis + v as u32 * events + e,
                        v % p.pcpus,
                        0x40,
                    )?;
                }
            }
            let ctlr = GICD_CTLR_ENABLE_G1
                | if mode == SimMode::V41 {
                    GICD_CTLR_NASSGIREQ
                } else {
                    0
                };
            vgic.gicd_write_ctlr(ctlr)?;
            if mode == SimMode::V41 && !vgic.nassgireq() {
                return Err(SimError::Params("host cannot provide vSGIs"));
            }
            sim.vgic = Some(vgic);
        }
        Ok(sim)
    }

    fn vgic(&self) -> Result<&VGic, SimError> {
        self.vgic
            .as_ref()
            .ok_or(SimError::Params("mode has no vGIC"))
    }

    /// Picks an ID in `base..base + count`, starting at `first`, that is not outstanding for
    /// `vcpu`, and records the send. None (a suppressed send) if all are outstanding.
    fn send(&mut self, vcpu: usize, base: u32, count: u32, first: u32) -> Option<u32> {
        let loaded = matches!(self.state[vcpu], VState::Running(_) | VState::Idle(_));
        for k in 0..count {
            let id = base + (first + k) % count;
            if let std::collections::btree_map::Entry::Vacant(e) = self.outstanding[vcpu].entry(id)
            {
                e.insert(loaded && self.mode != SimMode::V3);
                return Some(id);
            }
        }
        self.r.suppressed += 1;
        None
    }

    fn deliver(&mut self, vcpu: usize, id: u32, via_icv: bool) {
        match self.outstanding[vcpu].remove(&id) {
            Some(loaded_at_send) => {
                self.r.delivered += 1;
                if via_icv && loaded_at_send {
                    self.r.direct += 1;
                }
            }
            None => self.r.duplicated += 1,
        }
    }

    /// The hypervisor made a software interrupt pending for `t`: kick it if it runs (an
    /// exit), wake it if blocked. Returns the exits caused.
    fn sw_notify(&mut self, t: usize) -> u64 {
        match self.state[t] {
            VState::Running(_) => {
                self.r.exits += 1;
                1
            }
            VState::Idle(p) => {
                self.r.exits += 1;
                self.state[t] = VState::Running(p);
                1
            }
            VState::Blocked => {
                self.state[t] = VState::Runnable;
                self.runq.push_back(t);
                0
            }
            VState::Runnable => 0,
        }
    }

    fn run(mut self) -> Result<ModeReport, SimError> {
        let limit = self.p.ticks * 2 + 1000;
        let mut t = 0;
        while t < limit {
            let generating = t < self.p.ticks;
            if !generating && self.outstanding.iter().all(|o| o.is_empty()) {
                break;
            }
            self.tick(generating)?;
            t += 1;
        }
        self.r.ticks_run = t;
        self.r.lost = self.outstanding.iter().map(|o| o.len() as u64).sum();
        let g = self.host.gic();
        if let Some(st) = g.v41_stats() {
            self.r.vmovps = st.vmovps;
            self.r.doorbells = st.doorbells + st.individual_doorbells;
        }
        self.r.unpredictable = g.unpredictable_events().1;
        drop(g);
        Ok(self.r)
    }

    fn tick(&mut self, generating: bool) -> Result<(), SimError> {
        let n = self.p.vcpus;
        // Device MSIs.
        if generating {
            for v in 0..n {
                if self.rng.gen_bool(self.p.msi_prob) {
                    let first = self.rng.gen_range(0..self.p.events);
                    if let Some(id) = self.send(v, VINTID_BASE, self.p.events, first) {
                        self.r.msis += 1;
                        // Errors are recorded by the ITS; a dropped MSI shows up as lost.
                        let _ = self.host.gic().send_msi(0, v as u32 + 1, id - VINTID_BASE);
                    }
                }
            }
        }
        // Guest deliveries on every loaded vCPU.
        for p in 0..self.p.pcpus {
            if let Some(v) = self.cur[p] {
                self.guest_take(p, v)?;
            }
        }
        // Running vCPUs act.
        for p in 0..self.p.pcpus {
            let Some(v) = self.cur[p] else { continue };
            if self.state[v] != VState::Running(p) {
                continue;
            }
            if generating && n > 1 && self.rng.gen_bool(self.p.ipi_prob) {
                let mut target = self.rng.gen_range(0..n - 1);
                if target >= v {
                    target += 1;
                }
                let first = self.rng.gen_range(0..8u32);
                if let Some(sgi) = self.send(target, 0, 8, first) {
                    self.ipi(v, target, sgi)?;
                }
            } else if self.rng.gen_bool(self.p.wfi_prob) && !self.has_work(p, v)? {
                self.wfi(p, v)?;
            }
        }
        // Host interrupts (doorbells, GICv3 device LPIs).
        for p in 0..self.p.pcpus {
            while let Some(lpi) = self.host.take_irq(p) {
                if self.cur[p].is_some_and(|v| matches!(self.state[v], VState::Running(_))) {
                    self.r.exits += 1;
                }
                if lpi == ICH_MAINTENANCE_PPI {
                    if let Some(v) = self.cur[p] {
                        self.vif[v].maintenance(&mut self.host.gic())?;
                    }
                    continue;
                }
                self.host_irq(lpi)?;
            }
        }
        // Scheduler.
        for p in 0..self.p.pcpus {
            match self.cur[p] {
                None => self.schedule_in(p)?,
                Some(v) => {
                    self.slice_left[p] = self.slice_left[p].saturating_sub(1);
                    if self.slice_left[p] == 0 && !self.runq.is_empty() {
                        let blocking = matches!(self.state[v], VState::Idle(_));
                        self.put(p, v, blocking)?;
                        self.schedule_in(p)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn has_work(&mut self, p: usize, v: usize) -> Result<bool, SimError> {
        if self.vif[v].pending(&self.host.gic()) {
            return Ok(true);
        }
        if let Some(vg) = &self.vgic {
            if vg.sw_pending(v) != 0 {
                return Ok(true);
            }
        }
        Ok(self.host.gic().virq_line(p))
    }

    fn guest_take(&mut self, p: usize, v: usize) -> Result<(), SimError> {
        let mut woke = false;
        {
            if !self.icv_ready[v] {
                let mut g = self.host.gic();
                g.icv_write(p, IcvReg::Pmr, 0xFF).map_err(HypError::from)?;
                g.icv_write(p, IcvReg::Igrpen1, 1).map_err(HypError::from)?;
                self.icv_ready[v] = true;
            }
            loop {
                let i = {
                    let mut g = self.host.gic();
                    let i = g.icv_read(p, IcvReg::Iar1).map_err(HypError::from)? as u32;
                    if i != INTID_SPURIOUS {
                        g.icv_write(p, IcvReg::Eoir1, i as u64)
                            .map_err(HypError::from)?;
                    }
                    i
                };
                if i == INTID_SPURIOUS {
                    break;
                }
                self.deliver(v, i, true);
                woke = true;
            }
        }
        if matches!(self.state[v], VState::Running(_)) {
            // Software interrupts reach a running vCPU through the hypervisor's injection.
            while let Some(sgi) = self.vgic.as_ref().and_then(|g| g.sw_ack(v)) {
                self.deliver(v, sgi as u32, false);
            }
        }
        if woke {
            if let VState::Idle(pp) = self.state[v] {
                self.state[v] = VState::Running(pp);
            }
        }
        Ok(())
    }

    fn ipi(&mut self, from: usize, to: usize, sgi: u32) -> Result<(), SimError> {
        self.r.ipis += 1;
        // ICC_SGI1R_EL1 traps in every mode.
        self.r.exits += 1;
        self.r.ipi_exits += 1;
        let value = ((sgi as u64) << ICC_SGI1R_INTID_SHIFT)
            | (((to / 16) as u64) << ICC_SGI1R_AFF1_SHIFT)
            | (1u64 << (to % 16));
        let sw_targets = match &self.vgic {
            Some(vg) => vg.dispatch_sgi1r(from, value)?,
            None => {
                self.vif[to].inject(&mut self.host.gic(), sgi, 0x80, true)?;
                vec![to]
            }
        };
        for t in sw_targets {
            self.r.ipi_exits += self.sw_notify(t);
        }
        Ok(())
    }

    fn wfi(&mut self, p: usize, v: usize) -> Result<(), SimError> {
        let traps = match &self.vgic {
            None => true,
            Some(vg) => vg.wfi_traps(v, self.runq.is_empty()),
        };
        if !traps {
            self.r.wfi_resident += 1;
            self.state[v] = VState::Idle(p);
            return Ok(());
        }
        self.r.wfi_traps += 1;
        self.r.exits += 1;
        self.put(p, v, true)?;
        Ok(())
    }

    /// Deschedules `v` from `p`; `blocking` when it sits in WFI.
    fn put(&mut self, p: usize, v: usize, blocking: bool) -> Result<(), SimError> {
        self.cur[p] = None;
        let mut pending = false;
        if self.vif[v].loaded_on().is_some() {
            pending |= self.vif[v].put(&mut self.host.gic())?;
        }
        if let Some(vg) = &self.vgic {
            pending |= vg.sw_pending(v) != 0;
            pending |= vg.vcpu_put(v, blocking)?;
            let g = self.host.gic();
            if let Some(vpe) = vg.vm().vpeid(v).ok().and_then(|id| g.vpe(id)) {
                self.phase_start[v] = vpe.doorbells + vpe.individual_doorbells;
            }
        }
        if blocking && !pending {
            self.state[v] = VState::Blocked;
        } else {
            self.state[v] = VState::Runnable;
            self.runq.push_back(v);
        }
        Ok(())
    }

    fn schedule_in(&mut self, p: usize) -> Result<(), SimError> {
        let Some(v) = self.runq.pop_front() else {
            return Ok(());
        };
        if let Some(vg) = &self.vgic {
            let g = self.host.gic();
            if let Some(vpe) = vg.vm().vpeid(v).ok().and_then(|id| g.vpe(id)) {
                let in_phase =
                    (vpe.doorbells + vpe.individual_doorbells).saturating_sub(self.phase_start[v]);
                self.r.max_doorbells_per_phase = self.r.max_doorbells_per_phase.max(in_phase);
                if in_phase > 1 {
                    self.r.phases_with_repeat_doorbells += 1;
                }
            }
            drop(g);
            // A migration is a load on another redistributor than the vPE is mapped to.
            let from = vg.vm().col_idx(v)?;
            let moved = vg.vcpu_load(v, p)?;
            if from != p {
                self.r.migrations += 1;
                if !moved {
                    self.r.vmovps_skipped += 1;
                }
            }
        } else {
            if self.last_pcpu[v].is_some_and(|l| l != p) {
                self.r.migrations += 1;
            }
            self.vif[v].load(&mut self.host.gic(), p)?;
        }
        self.last_pcpu[v] = Some(p);
        self.cur[p] = Some(v);
        self.state[v] = VState::Running(p);
        self.slice_left[p] = self.p.slice;
        Ok(())
    }

    fn host_irq(&mut self, lpi: u32) -> Result<(), SimError> {
        if let Some(&(v, e)) = self.host_lpis.get(&lpi) {
            // GICv3: the hypervisor forwards the device interrupt in software.
            self.vif[v].inject(&mut self.host.gic(), VINTID_BASE + e, 0x80, true)?;
            self.sw_notify(v);
            return Ok(());
        }
        let woke = self.vgic()?.vm().handle_doorbell(lpi);
        if let Some(v) = woke {
            if self.state[v] == VState::Blocked {
                self.state[v] = VState::Runnable;
                self.runq.push_back(v);
            }
        }
        Ok(())
    }
}
