//! Emulated interrupts through list registers: one vCPU's virtual CPU interface context, the
//! way KVM's `vgic-v3.c` drives `ICH_*_EL2` (flush on entry, sync on exit).
//!
//! The hypervisor queues an emulated interrupt with [`VcpuIf::inject`]; while the vCPU is
//! loaded on a PE it goes straight into a free list register (ICH_ELRSR_EL2), otherwise it
//! waits in the context. [`VcpuIf::load`] restores ICH_VMCR_EL2, ICH_AP0R0/AP1R0_EL2 and
//! the saved list registers on a PE, fills free list registers from the queue and enables
//! the interface (with the underflow maintenance interrupt while interrupts still wait);
//! [`VcpuIf::put`] saves all of that and leaves the PE's interface empty and disabled. Loading
//! on another PE than the last is a vCPU migration: active and pending list register state,
//! the guest's priority mask, binary points and active priorities move with the vCPU.
//! [`VcpuIf::maintenance`] is the maintenance interrupt handler: it recycles list registers
//! the guest has finished with and refills them.

use std::collections::BTreeMap;

use gic::regs::*;
use gic::{Gic, GuestMem, IchReg};
use serde::{Deserialize, Serialize};

use crate::HypError;

/// Saved state of a vCPU's virtual CPU interface (what a hypervisor migrates).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuIfState {
    /// ICH_VMCR_EL2.
    pub vmcr: u64,
    /// ICH_AP0R0_EL2.
    pub ap0r0: u64,
    /// ICH_AP1R0_EL2.
    pub ap1r0: u64,
    /// ICH_LR<n>_EL2 as saved by the last `put`.
    pub lrs: Vec<u64>,
    /// Emulated interrupts not yet in a list register: `(vINTID, priority, Group 1)`.
    pub queued: Vec<(u32, u8, bool)>,
}

/// One vCPU's virtual CPU interface context.
#[derive(Debug, Clone, Default)]
pub struct VcpuIf {
    vmcr: u64,
    ap0r0: u64,
    ap1r0: u64,
    lrs: [u64; ICH_NUM_LRS],
    /// vINTID -> (priority, Group 1), waiting for a list register.
    queued: BTreeMap<u32, (u8, bool)>,
    loaded_on: Option<usize>,
}

fn lr_value(vintid: u32, prio: u8, group1: bool) -> u64 {
    (ICH_LR_STATE_PENDING << ICH_LR_STATE_SHIFT)
        | vintid as u64
        | ((prio as u64) << ICH_LR_PRIORITY_SHIFT)
        | if group1 { ICH_LR_GROUP } else { 0 }
}

fn lr_intid(lr: u64) -> u32 {
    (lr & ICH_LR_VINTID_MASK) as u32
}

fn lr_pending(lr: u64) -> bool {
    (lr >> ICH_LR_STATE_SHIFT) & ICH_LR_STATE_PENDING != 0
}

impl VcpuIf {
    /// An empty context (guest interface disabled, nothing pending).
    pub fn new() -> VcpuIf {
        VcpuIf::default()
    }

    /// PE the context is loaded on.
    pub fn loaded_on(&self) -> Option<usize> {
        self.loaded_on
    }

    /// Whether an emulated interrupt is pending for the vCPU (queued, or pending in a list
    /// register, saved or live).
    pub fn pending<M: GuestMem>(&self, gic: &Gic<M>) -> bool {
        if !self.queued.is_empty() {
            return true;
        }
        match self.loaded_on {
            Some(pe) => (0..ICH_NUM_LRS)
                .any(|n| gic.ich_read(pe, IchReg::Lr(n as u8)).is_ok_and(lr_pending)),
            None => self.lrs.iter().any(|l| lr_pending(*l)),
        }
    }

    /// Makes emulated interrupt `vintid` pending for the vCPU with `prio` in Group 1 or 0.
    /// An interrupt already pending (queued or in a list register) is not queued twice; one
    /// the guest is still handling (active in a list register) becomes pending and active,
    /// and is presented again once the guest deactivates it.
    pub fn inject<M: GuestMem>(
        &mut self,
        gic: &mut Gic<M>,
        vintid: u32,
        prio: u8,
        group1: bool,
    ) -> Result<(), HypError> {
        // One LR per vINTID (two would be UNPREDICTABLE): an LR holding it active becomes
        // pending and active, one holding it pending already has it.
        let holds = |lr: u64| lr_intid(lr) == vintid && lr >> ICH_LR_STATE_SHIFT != 0;
        let with_pending = |lr: u64| lr | (ICH_LR_STATE_PENDING << ICH_LR_STATE_SHIFT);
        match self.loaded_on {
            Some(pe) => {
                for n in 0..ICH_NUM_LRS as u8 {
                    let lr = gic.ich_read(pe, IchReg::Lr(n))?;
                    if holds(lr) {
                        return Ok(gic.ich_write(pe, IchReg::Lr(n), with_pending(lr))?);
                    }
                }
            }
            None => {
                if let Some(lr) = self.lrs.iter_mut().find(|l| holds(**l)) {
                    *lr = with_pending(*lr);
                    return Ok(());
                }
            }
        }
        self.queued.insert(vintid, (prio, group1));
        if let Some(pe) = self.loaded_on {
            self.flush(gic, pe)?;
        }
        Ok(())
    }

    /// Moves queued interrupts into free list registers (highest priority first) and arms
    /// the underflow maintenance interrupt while some still wait.
    fn flush<M: GuestMem>(&mut self, gic: &mut Gic<M>, pe: usize) -> Result<(), HypError> {
        let free = gic.ich_read(pe, IchReg::Elrsr)?;
        let mut order: Vec<(u8, u32, bool)> =
            self.queued.iter().map(|(i, (p, g))| (*p, *i, *g)).collect();
        order.sort_unstable();
        let mut next = order.into_iter();
        for n in 0..ICH_NUM_LRS {
            if free & (1 << n) == 0 {
                continue;
            }
            let Some((prio, vintid, group1)) = next.next() else {
                break;
            };
            gic.ich_write(pe, IchReg::Lr(n as u8), lr_value(vintid, prio, group1))?;
            self.queued.remove(&vintid);
        }
        let hcr = gic.ich_read(pe, IchReg::Hcr)?;
        let hcr = if self.queued.is_empty() {
            hcr & !ICH_HCR_UIE
        } else {
            hcr | ICH_HCR_UIE
        };
        gic.ich_write(pe, IchReg::Hcr, hcr | ICH_HCR_EN)?;
        Ok(())
    }

    /// Restores the context on PE `pe` and enables the interface (vCPU entry).
    pub fn load<M: GuestMem>(&mut self, gic: &mut Gic<M>, pe: usize) -> Result<(), HypError> {
        if self.loaded_on.is_some() {
            return Err(HypError::Invalid("virtual CPU interface already loaded"));
        }
        if gic.ich_read(pe, IchReg::Hcr)? & ICH_HCR_EN != 0 {
            return Err(HypError::Invalid(
                "the PE's virtual CPU interface is in use",
            ));
        }
        gic.ich_write(pe, IchReg::Vmcr, self.vmcr)?;
        gic.ich_write(pe, IchReg::Ap0r0, self.ap0r0)?;
        gic.ich_write(pe, IchReg::Ap1r0, self.ap1r0)?;
        for (n, lr) in self.lrs.iter().enumerate() {
            gic.ich_write(pe, IchReg::Lr(n as u8), *lr)?;
        }
        self.loaded_on = Some(pe);
        self.flush(gic, pe)
    }

    /// Saves the context from the PE it is loaded on and disables that PE's interface (vCPU
    /// exit). Returns whether an emulated interrupt is still pending.
    pub fn put<M: GuestMem>(&mut self, gic: &mut Gic<M>) -> Result<bool, HypError> {
        let Some(pe) = self.loaded_on else {
            return Err(HypError::Invalid("virtual CPU interface not loaded"));
        };
        self.vmcr = gic.ich_read(pe, IchReg::Vmcr)?;
        self.ap0r0 = gic.ich_read(pe, IchReg::Ap0r0)?;
        self.ap1r0 = gic.ich_read(pe, IchReg::Ap1r0)?;
        for n in 0..ICH_NUM_LRS {
            self.lrs[n] = gic.ich_read(pe, IchReg::Lr(n as u8))?;
            gic.ich_write(pe, IchReg::Lr(n as u8), 0)?;
        }
        // ICH_VMCR/AP*R need no clearing: the next load overwrites them, and with a vPE
        // resident they are that vPE's state.
        gic.ich_write(pe, IchReg::Hcr, 0)?;
        self.loaded_on = None;
        Ok(self.pending(gic))
    }

    /// The maintenance interrupt handler: forgets EOI-maintenance requests the guest has
    /// completed (ICH_EISR_EL2), resets EOIcount, and refills free list registers.
    pub fn maintenance<M: GuestMem>(&mut self, gic: &mut Gic<M>) -> Result<(), HypError> {
        let Some(pe) = self.loaded_on else {
            return Ok(());
        };
        let eisr = gic.ich_read(pe, IchReg::Eisr)?;
        for n in 0..ICH_NUM_LRS {
            if eisr & (1 << n) != 0 {
                gic.ich_write(pe, IchReg::Lr(n as u8), 0)?;
            }
        }
        let hcr = gic.ich_read(pe, IchReg::Hcr)?;
        gic.ich_write(pe, IchReg::Hcr, hcr & !(0x1F << ICH_HCR_EOICOUNT_SHIFT))?;
        self.flush(gic, pe)
    }

    /// The saved context (call while not loaded: a loaded context lives in the PE).
    pub fn state(&self) -> Result<VcpuIfState, HypError> {
        if self.loaded_on.is_some() {
            return Err(HypError::Invalid("save a virtual CPU interface after put"));
        }
        Ok(VcpuIfState {
            vmcr: self.vmcr,
            ap0r0: self.ap0r0,
            ap1r0: self.ap1r0,
            lrs: self.lrs.to_vec(),
            queued: self.queued.iter().map(|(i, (p, g))| (*i, *p, *g)).collect(),
        })
    }

    /// Rebuilds a (not loaded) context from a saved one.
    pub fn from_state(s: &VcpuIfState) -> Result<VcpuIf, HypError> {
        if s.lrs.len() != ICH_NUM_LRS {
            return Err(HypError::Invalid("saved list register count"));
        }
        let mut lrs = [0; ICH_NUM_LRS];
        lrs.copy_from_slice(&s.lrs);
        Ok(VcpuIf {
            vmcr: s.vmcr,
            ap0r0: s.ap0r0,
            ap1r0: s.ap1r0,
            lrs,
            queued: s.queued.iter().map(|(i, p, g)| (*i, (*p, *g))).collect(),
            loaded_on: None,
        })
    }
}
