//! The hypervisor's control of a PE's virtual CPU interface (`ICH_*_EL2`, IHI 0069 "Virtual
//! interrupt handling": list registers, ICH_HCR/VMCR/VTR/MISR/EISR/ELRSR/AP*R and the
//! maintenance interrupt).
//!
//! A hypervisor injects emulated interrupts by writing list registers; the guest takes them
//! through `ICV_*` exactly like direct GICv4.1 vLPIs and vSGIs, and the virtual CPU interface
//! presents whichever of the two has the higher priority. ICH_VMCR_EL2 and ICH_AP*R are
//! views of the guest's virtual CPU interface state ([`IcvState`]): the PE's own while no
//! vPE is resident there, the resident vPE's otherwise. Everything here is per PE and is
//! what a hypervisor saves and restores when it moves a vCPU.

use serde::{Deserialize, Serialize};

use crate::cpuif::{CpuIf, Group};
use crate::regs::*;
use crate::v41::IcvState;

/// A hypervisor register of a PE's virtual CPU interface (`ICH_*_EL2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IchReg {
    /// ICH_LR<n>_EL2 (n < [`ICH_NUM_LRS`]).
    Lr(u8),
    /// ICH_HCR_EL2.
    Hcr,
    /// ICH_VMCR_EL2 (a view of the guest's ICV state).
    Vmcr,
    /// ICH_VTR_EL2 (RO).
    Vtr,
    /// ICH_MISR_EL2 (RO): maintenance interrupt status.
    Misr,
    /// ICH_EISR_EL2 (RO): LRs with an EOI maintenance request.
    Eisr,
    /// ICH_ELRSR_EL2 (RO): empty LRs.
    Elrsr,
    /// ICH_AP0R0_EL2 (the guest's Group 0 active priorities).
    Ap0r0,
    /// ICH_AP1R0_EL2 (the guest's Group 1 active priorities).
    Ap1r0,
}

impl IchReg {
    /// Parses a register name as used by the qtest front end (`lr0`, `hcr`, `vmcr`, ...).
    pub fn from_name(s: &str) -> Option<IchReg> {
        let s = s.to_ascii_lowercase();
        if let Some(n) = s.strip_prefix("lr") {
            return n
                .parse::<u8>()
                .ok()
                .filter(|n| (*n as usize) < ICH_NUM_LRS)
                .map(IchReg::Lr);
        }
        Some(match s.as_str() {
            "hcr" => IchReg::Hcr,
            "vmcr" => IchReg::Vmcr,
            "vtr" => IchReg::Vtr,
            "misr" => IchReg::Misr,
            "eisr" => IchReg::Eisr,
            "elrsr" => IchReg::Elrsr,
            "ap0r0" => IchReg::Ap0r0,
            "ap1r0" => IchReg::Ap1r0,
            _ => return None,
        })
    }
}

/// Saved state of one PE's hypervisor interface (what `ICH_*_EL2` hold).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IchState {
    /// ICH_LR<n>_EL2.
    pub lrs: [u64; ICH_NUM_LRS],
    /// ICH_HCR_EL2.
    pub hcr: u64,
    /// The guest's virtual CPU interface state while no vPE is resident on the PE.
    pub icv: IcvState,
}

/// A list register interrupt the virtual CPU interface may present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LrCandidate {
    pub(crate) lr: usize,
    pub(crate) intid: u32,
    pub(crate) prio: u8,
    pub(crate) group1: bool,
}

pub(crate) fn lr_state(lr: u64) -> u64 {
    lr >> ICH_LR_STATE_SHIFT
}

fn set_lr_state(lr: &mut u64, state: u64) {
    *lr = (*lr & !(3 << ICH_LR_STATE_SHIFT)) | (state << ICH_LR_STATE_SHIFT);
}

impl IchState {
    pub(crate) fn enabled(&self) -> bool {
        self.hcr & ICH_HCR_EN != 0
    }

    /// Highest priority LR in the pending state whose group the guest enables (ties: lowest
    /// vINTID). A pending-and-active LR is not presented until it is deactivated.
    pub(crate) fn best_lr(&self, icv: &IcvState) -> Option<LrCandidate> {
        if !self.enabled() {
            return None;
        }
        let mut best: Option<LrCandidate> = None;
        for (i, &lr) in self.lrs.iter().enumerate() {
            if lr_state(lr) != ICH_LR_STATE_PENDING {
                continue;
            }
            let group1 = lr & ICH_LR_GROUP != 0;
            if !(if group1 { icv.igrpen1 } else { icv.igrpen0 }) {
                continue;
            }
            let c = LrCandidate {
                lr: i,
                intid: (lr & ICH_LR_VINTID_MASK) as u32,
                prio: ((lr >> ICH_LR_PRIORITY_SHIFT) as u8) & PRIORITY_MASK,
                group1,
            };
            if best.map_or(true, |b| (c.prio, c.intid) < (b.prio, b.intid)) {
                best = Some(c);
            }
        }
        best
    }

    /// ICV_IAR of an LR interrupt: pending -> active; a virtual LPI has no active state, so
    /// its LR becomes invalid.
    pub(crate) fn acknowledge(&mut self, lr: usize) {
        if let Some(l) = self.lrs.get_mut(lr) {
            let lpi = (*l & ICH_LR_VINTID_MASK) as u32 >= LPI_BASE;
            set_lr_state(l, if lpi { 0 } else { ICH_LR_STATE_ACTIVE });
        }
    }

    /// Deactivates vINTID `intid` (guest EOI with EOImode = 0, or ICV_DIR): returns the
    /// physical INTID to deactivate as well (HW = 1), `Some(None)` for a software LR, `None`
    /// when no LR holds it active (then EOIcount counts it).
    pub(crate) fn deactivate(&mut self, intid: u32) -> Option<Option<u32>> {
        let lr = self.lrs.iter_mut().find(|l| {
            (**l & ICH_LR_VINTID_MASK) as u32 == intid && lr_state(**l) & ICH_LR_STATE_ACTIVE != 0
        })?;
        let state = lr_state(*lr) & !ICH_LR_STATE_ACTIVE;
        set_lr_state(lr, state);
        Some(
            (*lr & ICH_LR_HW != 0)
                .then_some(((*lr >> ICH_LR_PINTID_SHIFT) & ICH_LR_PINTID_MASK) as u32),
        )
    }

    /// ICH_HCR_EL2.EOIcount + 1 (a 5-bit field that wraps, as the architecture says).
    pub(crate) fn count_eoi(&mut self) {
        let n = ((self.hcr >> ICH_HCR_EOICOUNT_SHIFT) + 1) & 0x1F;
        self.hcr = (self.hcr & !(0x1F << ICH_HCR_EOICOUNT_SHIFT)) | (n << ICH_HCR_EOICOUNT_SHIFT);
    }

    /// ICH_EISR_EL2: LRs that are invalid, not HW, with EOI = 1.
    pub(crate) fn eisr(&self) -> u64 {
        self.lr_bits(|l| lr_state(l) == 0 && l & ICH_LR_HW == 0 && l & ICH_LR_EOI != 0)
    }

    /// ICH_ELRSR_EL2: LRs that are invalid and need no EOI maintenance (free for reuse).
    pub(crate) fn elrsr(&self) -> u64 {
        self.lr_bits(|l| lr_state(l) == 0 && (l & ICH_LR_HW != 0 || l & ICH_LR_EOI == 0))
    }

    fn lr_bits(&self, f: impl Fn(u64) -> bool) -> u64 {
        self.lrs
            .iter()
            .enumerate()
            .filter(|(_, l)| f(**l))
            .fold(0, |acc, (i, _)| acc | 1 << i)
    }

    /// ICH_MISR_EL2 for the guest state `icv` (IHI 0069, ICH_MISR_EL2 and ICH_HCR_EL2).
    pub(crate) fn misr(&self, icv: &IcvState) -> u64 {
        let hcr = self.hcr;
        let valid = self.lrs.iter().filter(|l| lr_state(**l) != 0).count();
        let pending = self
            .lrs
            .iter()
            .any(|l| lr_state(*l) & ICH_LR_STATE_PENDING != 0);
        let mut m = 0;
        if self.eisr() != 0 {
            m |= ICH_MISR_EOI;
        }
        if hcr & ICH_HCR_UIE != 0 && valid <= 1 {
            m |= ICH_MISR_U;
        }
        if hcr & ICH_HCR_LRENPIE != 0 && (hcr >> ICH_HCR_EOICOUNT_SHIFT) & 0x1F != 0 {
            m |= ICH_MISR_LRENP;
        }
        if hcr & ICH_HCR_NPIE != 0 && !pending {
            m |= ICH_MISR_NP;
        }
        // VGrp0E, VGrp0D, VGrp1E, VGrp1D: HCR bits 4..7 gate the group enable states.
        let states = [icv.igrpen0, !icv.igrpen0, icv.igrpen1, !icv.igrpen1];
        for (i, s) in states.iter().enumerate() {
            if *s && hcr & (1 << (4 + i)) != 0 {
                m |= 1 << (4 + i);
            }
        }
        m
    }

    /// The maintenance interrupt's level: the interface is enabled and MISR is non-zero.
    pub(crate) fn maintenance(&self, icv: &IcvState) -> bool {
        self.enabled() && self.misr(icv) != 0
    }
}

impl IcvState {
    /// The guest state as a CPU interface, for priority grouping and preemption.
    pub(crate) fn cpuif(&self) -> CpuIf {
        let mut c = CpuIf::new();
        c.pmr = self.pmr;
        c.igrpen0 = self.igrpen0;
        c.igrpen1 = self.igrpen1;
        c.ap0r0 = self.ap0;
        c.ap1r0 = self.ap1;
        c.eoimode = self.eoimode;
        c.set_bpr0(self.bpr0 as u64);
        c.set_bpr1(self.bpr1 as u64);
        c
    }

    /// Takes back the state of a CPU interface built by [`IcvState::cpuif`].
    pub(crate) fn set_from(&mut self, c: &CpuIf) {
        self.pmr = c.pmr;
        self.igrpen0 = c.igrpen0;
        self.igrpen1 = c.igrpen1;
        self.ap0 = c.ap0r0;
        self.ap1 = c.ap1r0;
        self.eoimode = c.eoimode;
        self.bpr0 = c.bpr0;
        self.bpr1 = c.bpr1;
    }

    /// Whether a virtual interrupt may be signalled (ICV_PMR, running priority, binary point).
    pub(crate) fn can_signal(&self, group1: bool, prio: u8) -> bool {
        let g = if group1 { Group::G1 } else { Group::G0 };
        self.cpuif().can_signal(g, prio)
    }

    /// ICH_VMCR_EL2 encoding.
    pub(crate) fn vmcr(&self) -> u64 {
        (if self.igrpen0 { ICH_VMCR_VENG0 } else { 0 })
            | (if self.igrpen1 { ICH_VMCR_VENG1 } else { 0 })
            | ICH_VMCR_VFIQEN
            | (if self.eoimode { ICH_VMCR_VEOIM } else { 0 })
            | ((self.cpuif().bpr1 as u64) << ICH_VMCR_VBPR1_SHIFT)
            | ((self.cpuif().bpr0 as u64) << ICH_VMCR_VBPR0_SHIFT)
            | ((self.pmr as u64) << ICH_VMCR_VPMR_SHIFT)
    }

    /// Loads ICH_VMCR_EL2 (active priorities are ICH_AP*R's, not VMCR's).
    pub(crate) fn set_vmcr(&mut self, v: u64) {
        let mut c = self.cpuif();
        c.igrpen0 = v & ICH_VMCR_VENG0 != 0;
        c.igrpen1 = v & ICH_VMCR_VENG1 != 0;
        c.eoimode = v & ICH_VMCR_VEOIM != 0;
        c.set_bpr1((v >> ICH_VMCR_VBPR1_SHIFT) & 7);
        c.set_bpr0((v >> ICH_VMCR_VBPR0_SHIFT) & 7);
        c.pmr = (v >> ICH_VMCR_VPMR_SHIFT) as u8 & PRIORITY_MASK;
        self.set_from(&c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lr(state: u64, intid: u32, prio: u8, group1: bool) -> u64 {
        (state << ICH_LR_STATE_SHIFT)
            | intid as u64
            | ((prio as u64) << ICH_LR_PRIORITY_SHIFT)
            | if group1 { ICH_LR_GROUP } else { 0 }
    }

    #[test]
    fn eisr_elrsr_and_misr_follow_the_list_registers() {
        let mut s = IchState {
            hcr: ICH_HCR_EN | ICH_HCR_UIE | ICH_HCR_NPIE,
            ..IchState::default()
        };
        s.lrs[0] = lr(1, 40, 0x80, true);
        s.lrs[1] = ICH_LR_EOI | 41;
        assert_eq!(s.eisr(), 0b10);
        assert_eq!(s.elrsr(), 0b1100);
        let icv = IcvState::default();
        // One valid LR (underflow); one pending (no NP); an EOI request.
        assert_eq!(s.misr(&icv), ICH_MISR_EOI | ICH_MISR_U);
        s.acknowledge(0);
        assert_eq!(lr_state(s.lrs[0]), ICH_LR_STATE_ACTIVE);
        assert_eq!(s.misr(&icv), ICH_MISR_EOI | ICH_MISR_U | ICH_MISR_NP);
        assert_eq!(s.deactivate(40), Some(None));
        assert_eq!(s.deactivate(40), None, "no longer active");
        s.count_eoi();
        assert_eq!(s.hcr >> ICH_HCR_EOICOUNT_SHIFT, 1);
    }

    #[test]
    fn vmcr_round_trips_the_guest_state() {
        let mut icv = IcvState::default();
        let v = ICH_VMCR_VENG1
            | ICH_VMCR_VEOIM
            | (4 << ICH_VMCR_VBPR1_SHIFT)
            | (2 << ICH_VMCR_VBPR0_SHIFT)
            | (0xA8 << ICH_VMCR_VPMR_SHIFT);
        icv.set_vmcr(v);
        assert!(icv.igrpen1 && !icv.igrpen0 && icv.eoimode);
        assert_eq!(icv.pmr, 0xA8);
        assert_eq!(icv.vmcr(), v | ICH_VMCR_VFIQEN);
    }
}
