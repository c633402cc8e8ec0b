//! The per-PE CPU interface (ICC_*_EL1 system registers, Group 1 only): priority mask,
//! binary point, running priority via the active-priority bits, EOI mode and the Group 1
//! enable. The interrupt-state side effects of acknowledge and deactivate are applied by
//! [`crate::Gic`], which owns the distributor and redistributors.

use serde::{Deserialize, Serialize};

use crate::regs::*;

/// The ICC system registers the model implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IccReg {
    /// ICC_IAR1_EL1 (RO): acknowledge the highest priority pending Group 1 interrupt.
    Iar1,
    /// ICC_EOIR1_EL1 (WO): priority drop (and deactivate when EOImode = 0).
    Eoir1,
    /// ICC_DIR_EL1 (WO): deactivate (EOImode = 1).
    Dir,
    /// ICC_HPPIR1_EL1 (RO): highest priority pending Group 1 interrupt.
    Hppir1,
    /// ICC_RPR_EL1 (RO): running priority.
    Rpr,
    /// ICC_PMR_EL1: priority mask.
    Pmr,
    /// ICC_BPR1_EL1: Group 1 binary point.
    Bpr1,
    /// ICC_CTLR_EL1: EOImode and read-only identification fields.
    Ctlr,
    /// ICC_IGRPEN1_EL1: Group 1 interrupt enable.
    Igrpen1,
    /// ICC_SGI1R_EL1 (WO): generate a Group 1 SGI.
    Sgi1r,
    /// ICC_AP1R0_EL1: Group 1 active priorities (32 preemption levels).
    Ap1r0,
}

impl IccReg {
    /// Parses a register name as used by the qtest front end (`iar1`, `eoir1`, ...).
    pub fn from_name(s: &str) -> Option<IccReg> {
        Some(match s.to_ascii_lowercase().as_str() {
            "iar1" => IccReg::Iar1,
            "eoir1" => IccReg::Eoir1,
            "dir" => IccReg::Dir,
            "hppir1" => IccReg::Hppir1,
            "rpr" => IccReg::Rpr,
            "pmr" => IccReg::Pmr,
            "bpr1" => IccReg::Bpr1,
            "ctlr" => IccReg::Ctlr,
            "igrpen1" => IccReg::Igrpen1,
            "sgi1r" => IccReg::Sgi1r,
            "ap1r0" => IccReg::Ap1r0,
            _ => return None,
        })
    }
}

/// Saved state of one CPU interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIfState {
    /// ICC_PMR_EL1.
    pub pmr: u8,
    /// ICC_BPR1_EL1.
    pub bpr1: u8,
    /// ICC_CTLR_EL1.EOImode.
    pub eoimode: bool,
    /// ICC_IGRPEN1_EL1.Enable.
    pub igrpen1: bool,
    /// ICC_AP1R0_EL1.
    pub ap1r0: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct CpuIf {
    pub(crate) pmr: u8,
    pub(crate) bpr1: u8,
    pub(crate) eoimode: bool,
    pub(crate) igrpen1: bool,
    /// One bit per preemption level (group priority >> 3), bit 0 = highest priority.
    pub(crate) ap1r0: u32,
}

impl CpuIf {
    pub(crate) fn new() -> Self {
        CpuIf {
            pmr: 0,
            bpr1: BPR1_MIN,
            eoimode: false,
            igrpen1: false,
            ap1r0: 0,
        }
    }

    /// Group priority of `prio` under the current binary point: bits [7:BPR1].
    pub(crate) fn group_priority(&self, prio: u8) -> u8 {
        prio & (0xFFu8 << self.bpr1.min(BPR_MAX))
    }

    /// ICC_RPR_EL1: group priority of the highest priority active interrupt, or idle.
    pub(crate) fn running_priority(&self) -> u8 {
        if self.ap1r0 == 0 {
            PRIORITY_IDLE
        } else {
            (self.ap1r0.trailing_zeros() << (8 - PRIORITY_BITS)) as u8
        }
    }

    /// Whether an interrupt of priority `prio` may be signalled now: enabled group, below the
    /// priority mask, and able to preempt the running priority.
    pub(crate) fn can_signal(&self, prio: u8) -> bool {
        self.igrpen1 && prio < self.pmr && self.group_priority(prio) < self.running_priority()
    }

    /// Records the activation of an interrupt of priority `prio` in the active priorities.
    pub(crate) fn activate_priority(&mut self, prio: u8) {
        let level = self.group_priority(prio) >> (8 - PRIORITY_BITS);
        self.ap1r0 |= 1 << level;
    }

    /// Priority drop: clears the highest priority active level. Returns false when no
    /// priority was active.
    pub(crate) fn drop_priority(&mut self) -> bool {
        if self.ap1r0 == 0 {
            return false;
        }
        self.ap1r0 &= self.ap1r0 - 1;
        true
    }

    pub(crate) fn ctlr(&self) -> u64 {
        (if self.eoimode { ICC_CTLR_EOIMODE } else { 0 })
            | (((PRIORITY_BITS - 1) as u64) << ICC_CTLR_PRIBITS_SHIFT)
            | ICC_CTLR_A3V
    }

    pub(crate) fn set_ctlr(&mut self, v: u64) {
        self.eoimode = v & ICC_CTLR_EOIMODE != 0;
    }

    pub(crate) fn set_bpr1(&mut self, v: u64) {
        // Values below the minimum set the minimum (architected).
        self.bpr1 = ((v & 7) as u8).max(BPR1_MIN);
    }

    pub(crate) fn state(&self) -> CpuIfState {
        CpuIfState {
            pmr: self.pmr,
            bpr1: self.bpr1,
            eoimode: self.eoimode,
            igrpen1: self.igrpen1,
            ap1r0: self.ap1r0,
        }
    }

    pub(crate) fn restore(&mut self, s: &CpuIfState) {
        self.pmr = s.pmr & PRIORITY_MASK;
        self.bpr1 = (s.bpr1 & 7).max(BPR1_MIN);
        self.eoimode = s.eoimode;
        self.igrpen1 = s.igrpen1;
        self.ap1r0 = s.ap1r0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_priority_is_the_highest_active_group_priority() {
        let mut c = CpuIf::new();
        assert_eq!(c.running_priority(), 0xFF);
        c.activate_priority(0xA0);
        c.activate_priority(0x48);
        assert_eq!(c.running_priority(), 0x48);
        assert!(c.drop_priority());
        assert_eq!(c.running_priority(), 0xA0);
        assert!(c.drop_priority());
        assert!(!c.drop_priority(), "nothing left to drop");
    }

    #[test]
    fn binary_point_groups_priorities_for_preemption() {
        let mut c = CpuIf::new();
        c.igrpen1 = true;
        c.pmr = 0xF8;
        c.activate_priority(0x80);
        assert!(c.can_signal(0x78));
        c.set_bpr1(4);
        // Group priority bits [7:4]: 0x78 -> 0x70 still beats 0x80; 0x88 -> 0x80 does not.
        assert!(c.can_signal(0x78));
        assert!(!c.can_signal(0x88));
        // Group priority bit [7] only: 0x78 -> 0x00 preempts, 0xF0 -> 0x80 does not.
        c.set_bpr1(7);
        assert!(c.can_signal(0x78));
        assert!(!c.can_signal(0xF0));
        c.pmr = 0x70;
        assert!(
            !c.can_signal(0x78),
            "the priority mask applies to the full priority"
        );
    }
}
