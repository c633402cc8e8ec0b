//! The per-PE CPU interface (ICC_*_EL1 system registers of a single-security-state GIC):
//! priority mask, binary points, running priority via the Group 0 and Group 1 active-priority
//! bits, EOI mode and the group enables. Group 0 is signalled on the PE's FIQ line, Group 1 on
//! its IRQ line. The interrupt-state side effects of acknowledge and deactivate are applied by
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
    /// ICC_IAR0_EL1 (RO): acknowledge the highest priority pending Group 0 interrupt.
    Iar0,
    /// ICC_EOIR0_EL1 (WO): Group 0 priority drop (and deactivate when EOImode = 0).
    Eoir0,
    /// ICC_HPPIR0_EL1 (RO): highest priority pending Group 0 interrupt.
    Hppir0,
    /// ICC_BPR0_EL1: Group 0 binary point.
    Bpr0,
    /// ICC_IGRPEN0_EL1: Group 0 interrupt enable.
    Igrpen0,
    /// ICC_AP0R0_EL1: Group 0 active priorities.
    Ap0r0,
    /// ICC_SGI0R_EL1 (WO): generate an SGI that only Group 0 targets accept (same layout as
    /// ICC_SGI1R_EL1).
    Sgi0r,
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
            "iar0" => IccReg::Iar0,
            "eoir0" => IccReg::Eoir0,
            "hppir0" => IccReg::Hppir0,
            "bpr0" => IccReg::Bpr0,
            "igrpen0" => IccReg::Igrpen0,
            "ap0r0" => IccReg::Ap0r0,
            "sgi0r" => IccReg::Sgi0r,
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
    /// ICC_BPR0_EL1.
    #[serde(default = "bpr0_reset")]
    pub bpr0: u8,
    /// ICC_IGRPEN0_EL1.Enable.
    #[serde(default)]
    pub igrpen0: bool,
    /// ICC_AP0R0_EL1.
    #[serde(default)]
    pub ap0r0: u32,
}

fn bpr0_reset() -> u8 {
    BPR0_MIN
}

/// Interrupt group of a pending interrupt as the CPU interface sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    /// Group 0: FIQ, ICC_*0_EL1 registers.
    G0,
    /// Group 1: IRQ, ICC_*1_EL1 registers.
    G1,
}

#[derive(Debug, Clone)]
pub(crate) struct CpuIf {
    pub(crate) pmr: u8,
    pub(crate) bpr1: u8,
    pub(crate) eoimode: bool,
    pub(crate) igrpen1: bool,
    /// One bit per preemption level (group priority >> 3), bit 0 = highest priority.
    pub(crate) ap1r0: u32,
    pub(crate) bpr0: u8,
    pub(crate) igrpen0: bool,
    /// Group 0 active priorities, same encoding as `ap1r0`.
    pub(crate) ap0r0: u32,
}

impl CpuIf {
    pub(crate) fn new() -> Self {
        CpuIf {
            pmr: 0,
            bpr1: BPR1_MIN,
            eoimode: false,
            igrpen1: false,
            ap1r0: 0,
            bpr0: BPR0_MIN,
            igrpen0: false,
            ap0r0: 0,
        }
    }

    /// Whether the CPU interface accepts interrupts of `group` (ICC_IGRPEN0/1).
    #[inline]
    pub(crate) fn group_enabled(&self, group: Group) -> bool {
        match group {
            Group::G0 => self.igrpen0,
            Group::G1 => self.igrpen1,
        }
    }

    /// Group priority of `prio` under its group's binary point: bits \[7:BPR0+1\] for
    /// Group 0, bits \[7:BPR1\] for Group 1.
    #[inline]
    pub(crate) fn group_priority(&self, group: Group, prio: u8) -> u8 {
        let shift = match group {
            Group::G0 => (self.bpr0 + 1).min(BPR_MAX + 1),
            Group::G1 => self.bpr1.min(BPR_MAX),
        };
        (prio as u16 & (0xFFu16 << shift)) as u8
    }

    /// ICC_RPR_EL1: group priority of the highest priority active interrupt of either group,
    /// or idle.
    #[inline]
    pub(crate) fn running_priority(&self) -> u8 {
        let ap = self.ap0r0 | self.ap1r0;
        if ap == 0 {
            PRIORITY_IDLE
        } else {
            (ap.trailing_zeros() << (8 - PRIORITY_BITS)) as u8
        }
    }

    /// Whether an interrupt of `group` and priority `prio` may be signalled now: below the
    /// priority mask and able to preempt the running priority (group enables are applied
    /// when the highest priority pending interrupt is chosen).
    #[inline]
    pub(crate) fn can_signal(&self, group: Group, prio: u8) -> bool {
        prio < self.pmr && self.group_priority(group, prio) < self.running_priority()
    }

    /// Records the activation of an interrupt in its group's active priorities.
    #[inline]
    pub(crate) fn activate_priority(&mut self, group: Group, prio: u8) {
        let level = self.group_priority(group, prio) >> (8 - PRIORITY_BITS);
        match group {
            Group::G0 => self.ap0r0 |= 1 << level,
            Group::G1 => self.ap1r0 |= 1 << level,
        }
    }

    /// Priority drop for `group`: clears the highest priority active level if it belongs to
    /// that group. Returns false (and changes nothing) when no priority is active or the
    /// highest active priority belongs to the other group (UNPREDICTABLE in the architecture).
    #[inline]
    pub(crate) fn drop_priority(&mut self, group: Group) -> bool {
        let lowest = |v: u32| if v == 0 { 32 } else { v.trailing_zeros() };
        let (mine, other) = match group {
            Group::G0 => (&mut self.ap0r0, self.ap1r0),
            Group::G1 => (&mut self.ap1r0, self.ap0r0),
        };
        if *mine == 0 || lowest(*mine) > lowest(other) {
            return false;
        }
        *mine &= *mine - 1;
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

    pub(crate) fn set_bpr0(&mut self, v: u64) {
        self.bpr0 = ((v & 7) as u8).max(BPR0_MIN);
    }

    pub(crate) fn state(&self) -> CpuIfState {
        CpuIfState {
            pmr: self.pmr,
            bpr1: self.bpr1,
            eoimode: self.eoimode,
            igrpen1: self.igrpen1,
            ap1r0: self.ap1r0,
            bpr0: self.bpr0,
            igrpen0: self.igrpen0,
            ap0r0: self.ap0r0,
        }
    }

    pub(crate) fn restore(&mut self, s: &CpuIfState) {
        self.pmr = s.pmr & PRIORITY_MASK;
        self.bpr1 = (s.bpr1 & 7).max(BPR1_MIN);
        self.eoimode = s.eoimode;
        self.igrpen1 = s.igrpen1;
        self.ap1r0 = s.ap1r0;
        self.bpr0 = (s.bpr0 & 7).max(BPR0_MIN);
        self.igrpen0 = s.igrpen0;
        self.ap0r0 = s.ap0r0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_priority_is_the_highest_active_group_priority() {
        let mut c = CpuIf::new();
        assert_eq!(c.running_priority(), 0xFF);
        c.activate_priority(Group::G1, 0xA0);
        c.activate_priority(Group::G0, 0x48);
        assert_eq!(c.running_priority(), 0x48);
        assert!(
            !c.drop_priority(Group::G1),
            "the highest active priority is Group 0's"
        );
        assert!(c.drop_priority(Group::G0));
        assert_eq!(c.running_priority(), 0xA0);
        assert!(c.drop_priority(Group::G1));
        assert!(!c.drop_priority(Group::G1), "nothing left to drop");
    }

    #[test]
    fn binary_point_groups_priorities_for_preemption() {
        let mut c = CpuIf::new();
        c.pmr = 0xF8;
        c.activate_priority(Group::G1, 0x80);
        assert!(c.can_signal(Group::G1, 0x78));
        c.set_bpr1(4);
        // Group priority bits [7:4]: 0x78 -> 0x70 still beats 0x80; 0x88 -> 0x80 does not.
        assert!(c.can_signal(Group::G1, 0x78));
        assert!(!c.can_signal(Group::G1, 0x88));
        // Group priority bit [7] only: 0x78 -> 0x00 preempts, 0xF0 -> 0x80 does not.
        c.set_bpr1(7);
        assert!(c.can_signal(Group::G1, 0x78));
        assert!(!c.can_signal(Group::G1, 0xF0));
        // BPR0 = n groups bits [7:n+1]: BPR0 = 6 keeps bit 7 only.
        c.set_bpr0(6);
        assert!(c.can_signal(Group::G0, 0x78));
        assert!(!c.can_signal(Group::G0, 0xF0));
        c.set_bpr0(0);
        assert_eq!(c.bpr0, BPR0_MIN, "clamped to the minimum");
        c.pmr = 0x70;
        assert!(
            !c.can_signal(Group::G1, 0x78),
            "the priority mask applies to the full priority"
        );
    }
}
