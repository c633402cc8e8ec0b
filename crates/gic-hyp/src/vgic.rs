//! The virtual GIC the guest sees, for the parts the GICv4.1 series touched (KVM's
//! `vgic-mmio-v3.c` / `vgic-v4.c`): GICD_TYPER2.nASSGIcap and GICD_CTLR.nASSGIreq, switching
//! all SGIs between software emulation and hardware vSGIs (both directions, keeping enable,
//! group, priority and pending state), routing the guest's SGI register accesses to the
//! hardware for hardware-backed SGIs, delivering ICC_SGI1R_EL1 with GITS_SGIR, reloading
//! residency when the guest toggles the distributor, save/restore that re-applies nASSGIreq
//! on first run, the WFI trapping decision and the debug view of SGI state.
//!
//! Software-emulated SGIs keep their state here; the hypervisor injects them (list
//! registers, outside this crate) — [`VGic::sw_ack`] stands for that injection.

use std::sync::Mutex;

use gic::regs::*;
use serde::{Deserialize, Serialize};

use crate::vm::{SgiConfig, Vm};
use crate::{lock, HypError};

/// One SGI of one vCPU as the vGIC tracks it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgiState {
    /// Backed by a hardware vSGI.
    pub hw: bool,
    /// GICR_ISENABLER0 bit.
    pub enabled: bool,
    /// GICR_IGROUPR0 bit.
    pub group1: bool,
    /// GICR_IPRIORITYR byte (5 bits kept).
    pub priority: u8,
    /// Software pending latch (meaningless while `hw`: the GIC holds it).
    pub pending_latch: bool,
    /// Software active state (hardware vSGIs have none).
    pub active: bool,
}

/// Saved vGIC state (what userspace saves and restores through the device attributes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VgicState {
    /// GICD_CTLR.EnableGrp1.
    pub enabled: bool,
    /// GICD_CTLR.nASSGIreq.
    pub nassgireq: bool,
    /// Per vCPU, per SGI; `pending_latch` holds the pending state whether or not the SGI
    /// was hardware-backed when saved.
    pub sgis: Vec<Vec<SgiState>>,
}

/// One line of the debug view (KVM's `vgic-state` debugfs file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SgiDebug {
    /// SGI number.
    pub intid: u8,
    /// Hardware-backed.
    pub hw: bool,
    /// Enabled.
    pub enabled: bool,
    /// Pending (read from GICR_VSGIPENDR for hardware SGIs).
    pub pending: bool,
    /// Group 1.
    pub group1: bool,
    /// Priority.
    pub priority: u8,
}

/// What a guest GICD_CTLR write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtlrEffect {
    /// SGIs were switched between software and hardware.
    pub switched: bool,
    /// Resident vCPUs were reloaded so VPENDBASER.vGrp1En follows the distributor enable.
    pub reloaded: usize,
}

#[derive(Debug)]
struct Inner {
    enabled: bool,
    nassgireq: bool,
    sgis: Vec<[SgiState; 16]>,
    first_run_pending: bool,
}

/// The guest-visible vGIC of one VM, on top of its [`Vm`].
#[derive(Debug)]
pub struct VGic {
    vm: Vm,
    cap: bool,
    inner: Mutex<Inner>,
}

impl VGic {
    /// Wraps `vm`. `cpuif_vsgi` says whether the CPU interface can take vSGIs
    /// (ID_AA64PFR0_EL1.GIC >= 0b0011): without it nASSGIcap is hidden (the 2021 fix).
    pub fn new(vm: Vm, cpuif_vsgi: bool) -> VGic {
        let cap = vm.host().info().vsgi && cpuif_vsgi;
        let n = vm.vcpus();
        VGic {
            vm,
            cap,
            inner: Mutex::new(Inner {
                enabled: false,
                nassgireq: false,
                sgis: vec![[SgiState::default(); 16]; n],
                first_run_pending: false,
            }),
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// GICD_TYPER2.nASSGIcap as the guest sees it.
    pub fn nassgi_cap(&self) -> bool {
        self.cap
    }

    /// Whether the guest asked for active-less SGIs.
    pub fn nassgireq(&self) -> bool {
        lock(&self.inner).nassgireq
    }

    /// Whether the guest distributor is enabled.
    pub fn enabled(&self) -> bool {
        lock(&self.inner).enabled
    }

    /// A guest read of a distributor register (only GICD_CTLR and GICD_TYPER2 are modelled
    /// here; others read 0).
    pub fn gicd_read(&self, offset: u64) -> u32 {
        let s = lock(&self.inner);
        match offset {
            GICD_CTLR => {
                (if s.enabled { GICD_CTLR_ENABLE_G1 } else { 0 })
                    | GICD_CTLR_ARE
                    | GICD_CTLR_DS
                    | if s.nassgireq { GICD_CTLR_NASSGIREQ } else { 0 }
            }
            GICD_TYPER2 if self.cap => GICD_TYPER2_NASSGICAP,
            _ => 0,
        }
    }

    /// A guest write of GICD_CTLR (the caller has halted the vCPUs, as KVM does under the
    /// config lock). nASSGIreq is read-only while the distributor stays enabled; changing it
    /// switches every SGI; toggling the enable reloads resident vCPUs.
    pub fn gicd_write_ctlr(&self, value: u32) -> Result<CtlrEffect, HypError> {
        let (was_enabled, old_req) = {
            let s = lock(&self.inner);
            (s.enabled, s.nassgireq)
        };
        let enabled = value & GICD_CTLR_ENABLE_G1 != 0;
        let mut req = self.cap && value & GICD_CTLR_NASSGIREQ != 0;
        if was_enabled && enabled {
            req = old_req;
        }
        {
            let mut s = lock(&self.inner);
            s.enabled = enabled;
            s.nassgireq = req;
        }
        let mut eff = CtlrEffect::default();
        if req != old_req {
            self.configure_vsgis(req)?;
            eff.switched = true;
        }
        if self.cap && was_enabled != enabled {
            for vcpu in 0..self.vm.vcpus() {
                if self.vm.is_resident(vcpu)? {
                    let pe = self.vm.col_idx(vcpu)?;
                    self.vm.vcpu_put(vcpu, false)?;
                    self.vm.vcpu_load(vcpu, pe, enabled)?;
                    eff.reloaded += 1;
                }
            }
        }
        Ok(eff)
    }

    /// Switches every SGI of every vCPU to hardware vSGIs (`hw`) or back, preserving
    /// enable, group, priority and pending state (`vgic_v4_configure_vsgis`).
    pub fn configure_vsgis(&self, hw: bool) -> Result<(), HypError> {
        for vcpu in 0..self.vm.vcpus() {
            for sgi in 0..16u8 {
                let st = lock(&self.inner).sgis[vcpu][sgi as usize];
                if hw && !st.hw {
                    self.vm.vsgi_configure(vcpu, sgi, cfg_of(&st))?;
                    if st.pending_latch {
                        self.vm.vsgi_set_pending(vcpu, sgi)?;
                    } else {
                        self.vm.vsgi_clear_pending(vcpu, sgi)?;
                    }
                    let mut s = lock(&self.inner);
                    let e = &mut s.sgis[vcpu][sgi as usize];
                    e.hw = true;
                    e.pending_latch = false;
                    e.active = false;
                } else if !hw && st.hw {
                    let pending = self.vm.vsgi_pending(vcpu)? & (1 << sgi) != 0;
                    self.vm.vsgi_configure(vcpu, sgi, SgiConfig::default())?;
                    self.vm.vsgi_clear_pending(vcpu, sgi)?;
                    let mut s = lock(&self.inner);
                    let e = &mut s.sgis[vcpu][sgi as usize];
                    e.hw = false;
                    e.pending_latch = pending;
                }
            }
        }
        Ok(())
    }

    fn sgi_state(&self, vcpu: usize, sgi: u8) -> Result<SgiState, HypError> {
        lock(&self.inner)
            .sgis
            .get(vcpu)
            .and_then(|a| a.get(sgi as usize))
            .copied()
            .ok_or(HypError::NoSuchVcpu(vcpu))
    }

    fn update(&self, vcpu: usize, sgi: u8, f: impl FnOnce(&mut SgiState)) -> SgiState {
        let mut s = lock(&self.inner);
        let e = &mut s.sgis[vcpu][sgi as usize];
        f(e);
        *e
    }

    /// A guest 32-bit read of an SGI_base register of `vcpu`'s redistributor (SGI bits only;
    /// PPI bits read 0 here). Pending state of hardware SGIs comes from GICR_VSGIPENDR.
    pub fn sgi_read(&self, vcpu: usize, offset: u64) -> Result<u32, HypError> {
        if vcpu >= self.vm.vcpus() {
            return Err(HypError::NoSuchVcpu(vcpu));
        }
        let sgis = lock(&self.inner).sgis[vcpu];
        let bits = |f: &dyn Fn(&SgiState) -> bool| {
            sgis.iter()
                .enumerate()
                .fold(0u32, |acc, (i, s)| acc | ((f(s) as u32) << i))
        };
        Ok(match offset {
            GICR_IGROUPR0 => bits(&|s| s.group1),
            GICR_ISENABLER0 | GICR_ICENABLER0 => bits(&|s| s.enabled),
            GICR_ISPENDR0 | GICR_ICPENDR0 => {
                let hwp = if sgis.iter().any(|s| s.hw) {
                    self.vm.vsgi_pending(vcpu)? as u32
                } else {
                    0
                };
                bits(&|s| !s.hw && s.pending_latch) | (hwp & bits(&|s| s.hw))
            }
            GICR_ISACTIVER0 | GICR_ICACTIVER0 => bits(&|s| !s.hw && s.active),
            o if (GICR_IPRIORITYR..GICR_IPRIORITYR + 16).contains(&o) => {
                let first = (o - GICR_IPRIORITYR) as usize & !3;
                (0..4).fold(0u32, |acc, k| {
                    acc | ((sgis[first + k].priority as u32) << (8 * k))
                })
            }
            _ => 0,
        })
    }

    /// A guest 32-bit write of an SGI_base register of `vcpu`'s redistributor, routed to the
    /// hardware for hardware-backed SGIs. Active-state writes to hardware SGIs are ignored.
    pub fn sgi_write(&self, vcpu: usize, offset: u64, value: u32) -> Result<(), HypError> {
        if vcpu >= self.vm.vcpus() {
            return Err(HypError::NoSuchVcpu(vcpu));
        }
        if (GICR_IPRIORITYR..GICR_IPRIORITYR + 16).contains(&offset) {
            let first = (offset - GICR_IPRIORITYR) as u8 & !3;
            for k in 0..4u8 {
                let p = (value >> (8 * k)) as u8 & PRIORITY_MASK;
                let st = self.update(vcpu, first + k, |s| s.priority = p);
                if st.hw {
                    self.vm.vsgi_configure(vcpu, first + k, cfg_of(&st))?;
                }
            }
            return Ok(());
        }
        for sgi in 0..16u8 {
            let on = value & (1 << sgi) != 0;
            let st = self.sgi_state(vcpu, sgi)?;
            match offset {
                GICR_IGROUPR0 => {
                    let st = self.update(vcpu, sgi, |s| s.group1 = on);
                    if st.hw {
                        self.vm.vsgi_configure(vcpu, sgi, cfg_of(&st))?;
                    }
                }
                GICR_ISENABLER0 | GICR_ICENABLER0 if on => {
                    let set = offset == GICR_ISENABLER0;
                    let st = self.update(vcpu, sgi, |s| s.enabled = set);
                    if st.hw {
                        self.vm.vsgi_configure(vcpu, sgi, cfg_of(&st))?;
                    }
                }
                GICR_ISPENDR0 if on => {
                    if st.hw {
                        self.vm.vsgi_set_pending(vcpu, sgi)?;
                    } else {
                        self.update(vcpu, sgi, |s| s.pending_latch = true);
                    }
                }
                GICR_ICPENDR0 if on => {
                    if st.hw {
                        self.vm.vsgi_clear_pending(vcpu, sgi)?;
                    } else {
                        self.update(vcpu, sgi, |s| s.pending_latch = false);
                    }
                }
                GICR_ISACTIVER0 | GICR_ICACTIVER0 if on && !st.hw => {
                    let set = offset == GICR_ISACTIVER0;
                    self.update(vcpu, sgi, |s| s.active = set);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The guest on `sender` wrote ICC_SGI1R_EL1 (trapped). Hardware-backed targets get a
    /// GITS_SGIR write; the returned vCPUs got a software pending latch and need an injection
    /// (a kick if running).
    pub fn dispatch_sgi1r(&self, sender: usize, value: u64) -> Result<Vec<usize>, HypError> {
        let sgi = ((value >> ICC_SGI1R_INTID_SHIFT) & 0xF) as u8;
        let n = self.vm.vcpus();
        let targets: Vec<usize> = if value & ICC_SGI1R_IRM != 0 {
            (0..n).filter(|&v| v != sender).collect()
        } else {
            let aff1 = ((value >> ICC_SGI1R_AFF1_SHIFT) & 0xFF) as usize;
            let rs = ((value >> ICC_SGI1R_RS_SHIFT) & 0xF) as usize;
            let aff23 =
                (value >> ICC_SGI1R_AFF2_SHIFT) & 0xFF | (value >> ICC_SGI1R_AFF3_SHIFT) & 0xFF;
            // vCPU i has Aff0 = i % 16, Aff1 = i / 16 (so RS must be 0).
            if aff23 != 0 || rs != 0 {
                Vec::new()
            } else {
                (0..16)
                    .filter(|b| value & (1 << b) != 0)
                    .map(|b| aff1 * 16 + b)
                    .filter(|&v| v < n)
                    .collect()
            }
        };
        let mut sw = Vec::new();
        for t in targets {
            if self.sgi_state(t, sgi)?.hw {
                self.vm.vsgi_set_pending(t, sgi)?;
            } else {
                self.update(t, sgi, |s| s.pending_latch = true);
                sw.push(t);
            }
        }
        Ok(sw)
    }

    /// Software SGIs of `vcpu` pending and enabled (what the hypervisor would put in list
    /// registers).
    pub fn sw_pending(&self, vcpu: usize) -> u16 {
        lock(&self.inner).sgis.get(vcpu).map_or(0, |a| {
            a.iter().enumerate().fold(0u16, |acc, (i, s)| {
                acc | (((!s.hw && s.enabled && s.pending_latch && !s.active) as u16) << i)
            })
        })
    }

    /// Injects and completes the lowest pending software SGI of `vcpu` (stands for a list
    /// register round trip): returns its number.
    pub fn sw_ack(&self, vcpu: usize) -> Option<u8> {
        let p = self.sw_pending(vcpu);
        if p == 0 {
            return None;
        }
        let sgi = p.trailing_zeros() as u8;
        self.update(vcpu, sgi, |s| s.pending_latch = false);
        Some(sgi)
    }

    /// Loads `vcpu` on `pcpu` with vGrp1En following the distributor enable.
    pub fn vcpu_load(&self, vcpu: usize, pcpu: usize) -> Result<bool, HypError> {
        let en = self.enabled();
        self.vm.vcpu_load(vcpu, pcpu, en)
    }

    /// Puts `vcpu` (see [`Vm::vcpu_put`]).
    pub fn vcpu_put(&self, vcpu: usize, blocking: bool) -> Result<bool, HypError> {
        self.vm.vcpu_put(vcpu, blocking)
    }

    /// KVM's `kvm_vcpu_should_clear_twi`: WFI need not trap when the pCPU runs only this
    /// vCPU and the vCPU has vLPIs or the VM uses hardware SGIs.
    pub fn wfi_traps(&self, vcpu: usize, single_task: bool) -> bool {
        !(single_task && (self.vm.vlpi_count(vcpu) > 0 || self.nassgireq()))
    }

    /// The debug view of `vcpu`'s SGIs; hardware SGIs report the GIC's pending bit.
    pub fn debug_sgis(&self, vcpu: usize) -> Result<Vec<SgiDebug>, HypError> {
        if vcpu >= self.vm.vcpus() {
            return Err(HypError::NoSuchVcpu(vcpu));
        }
        let sgis = lock(&self.inner).sgis[vcpu];
        let hwp = if sgis.iter().any(|s| s.hw) {
            self.vm.vsgi_pending(vcpu)?
        } else {
            0
        };
        Ok(sgis
            .iter()
            .enumerate()
            .map(|(i, s)| SgiDebug {
                intid: i as u8,
                hw: s.hw,
                enabled: s.enabled,
                pending: if s.hw {
                    hwp & (1 << i) != 0
                } else {
                    s.pending_latch
                },
                group1: s.group1,
                priority: s.priority,
            })
            .collect())
    }

    /// Saves the vGIC (userspace reads: hardware pending state is queried).
    pub fn save(&self) -> Result<VgicState, HypError> {
        let mut sgis = Vec::new();
        for vcpu in 0..self.vm.vcpus() {
            let dbg = self.debug_sgis(vcpu)?;
            let row = lock(&self.inner).sgis[vcpu];
            sgis.push(
                row.iter()
                    .zip(&dbg)
                    .map(|(s, d)| SgiState {
                        hw: false,
                        pending_latch: d.pending,
                        ..*s
                    })
                    .collect(),
            );
        }
        let s = lock(&self.inner);
        Ok(VgicState {
            enabled: s.enabled,
            nassgireq: s.nassgireq,
            sgis,
        })
    }

    /// Restores a saved vGIC into this (fresh) one: state is set without switching; the
    /// switch to hardware SGIs happens at [`VGic::first_run`], as KVM's
    /// `vgic_v3_map_resources` does.
    pub fn restore(&self, st: &VgicState) -> Result<(), HypError> {
        if st.sgis.len() != self.vm.vcpus() || st.sgis.iter().any(|r| r.len() != 16) {
            return Err(HypError::Invalid("saved vGIC has the wrong shape"));
        }
        if st.nassgireq && !self.cap {
            return Err(HypError::Invalid("nASSGIreq saved on a host without vSGIs"));
        }
        let mut s = lock(&self.inner);
        s.enabled = st.enabled;
        s.nassgireq = st.nassgireq;
        for (dst, src) in s.sgis.iter_mut().zip(&st.sgis) {
            for (d, x) in dst.iter_mut().zip(src) {
                *d = SgiState { hw: false, ..*x };
            }
        }
        s.first_run_pending = st.nassgireq;
        Ok(())
    }

    /// First run after a restore: re-applies nASSGIreq by switching the SGIs to hardware.
    pub fn first_run(&self) -> Result<(), HypError> {
        let pending = std::mem::take(&mut lock(&self.inner).first_run_pending);
        if pending {
            self.configure_vsgis(true)?;
        }
        Ok(())
    }
}

fn cfg_of(s: &SgiState) -> SgiConfig {
    SgiConfig {
        enabled: s.enabled,
        group1: s.group1,
        priority: s.priority,
    }
}
