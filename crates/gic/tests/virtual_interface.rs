//! The hypervisor's virtual CPU interface (ICH_*_EL2) and the guest's ICV_* registers on a
//! GICv3 (list registers only) and a GICv4.1 (list registers beside direct vLPIs). Rules from
//! IHI 0069, "Virtual interrupt handling and prioritization" and the ICH_*/ICV_* register
//! descriptions.

mod common;

use common::*;
use gic::regs::*;
use gic::{Gic, IccReg, IchReg, IcvReg, VcpuError};

fn lr(state: u64, vintid: u32, prio: u8) -> u64 {
    (state << ICH_LR_STATE_SHIFT)
        | vintid as u64
        | ((prio as u64) << ICH_LR_PRIORITY_SHIFT)
        | ICH_LR_GROUP
}

/// A GICv3 with the host's PPI 25 (maintenance) enabled on every PE and a guest interface
/// enabled on PE 0 (ICH_HCR.En, VMCR: VENG1, PMR 0xF8).
fn rig() -> Driver {
    let mut d = Driver::booted(2);
    for pe in 0..2 {
        let sgi = d.sgi(pe);
        d.w32(sgi + GICR_IGROUPR0, 0xFFFF_FFFF);
        d.w32(sgi + GICR_ISENABLER0, 1 << ICH_MAINTENANCE_PPI | 1 << 30);
    }
    d.gic.ich_write(0, IchReg::Hcr, ICH_HCR_EN).unwrap();
    d.gic
        .ich_write(
            0,
            IchReg::Vmcr,
            ICH_VMCR_VENG1 | (0xF8 << ICH_VMCR_VPMR_SHIFT),
        )
        .unwrap();
    d
}

fn maintenance_pending(d: &Driver, pe: usize) -> bool {
    d.gic.is_pending(pe, ICH_MAINTENANCE_PPI)
}

#[test]
fn ich_vtr_describes_four_list_registers_and_five_priority_bits() {
    let d = rig();
    let vtr = d.gic.ich_read(0, IchReg::Vtr).unwrap();
    assert_eq!(vtr & 0x1F, 3, "ListRegs = 4 - 1");
    assert_eq!((vtr >> 29) & 7, 4, "PRIbits = 5 - 1");
    assert_eq!((vtr >> 26) & 7, 4, "PREbits = 5 - 1");
    assert_eq!(vtr & (1 << 20), 0, "nV4 = 0: direct injection supported");
    assert_eq!(
        d.gic.ich_read(0, IchReg::Lr(4)),
        Err(VcpuError::NoSuchLr(4))
    );
    let mut d = d;
    assert_eq!(
        d.gic.ich_write(0, IchReg::Misr, 1),
        Err(VcpuError::IchReadOnly(IchReg::Misr))
    );
    // Without ICH_HCR.En (and no vPE) nothing runs on PE 1: ICV accesses are refused.
    assert!(d.gic.icv_read(1, IcvReg::Iar1).is_err());
}

/// ICH_LR<n>_EL2.HW = 1: the guest's deactivation of the virtual interrupt deactivates the
/// physical one (IHI 0069, "Virtual interrupts with a corresponding physical interrupt").
#[test]
fn guest_eoi_of_a_hw_list_register_deactivates_the_physical_interrupt() {
    let mut d = rig();
    // The host takes PPI 30 and only drops its priority (EOImode = 1): it stays active.
    d.gic.icc_write(0, IccReg::Ctlr, ICC_CTLR_EOIMODE).unwrap();
    d.gic.set_ppi_pending(0, 30);
    assert_eq!(d.iar(0), 30);
    d.eoi(0, 30);
    assert!(d.gic.is_active(0, 30));
    let v = lr(1, 27, 0x80) | ICH_LR_HW | (30 << ICH_LR_PINTID_SHIFT);
    d.gic.ich_write(0, IchReg::Lr(0), v).unwrap();
    assert!(d.gic.virq_line(0));
    assert_eq!(d.gic.icv_read(0, IcvReg::Iar1).unwrap(), 27);
    assert_eq!(d.gic.icv_read(0, IcvReg::Rpr).unwrap(), 0x80);
    d.gic.icv_write(0, IcvReg::Eoir1, 27).unwrap();
    assert!(!d.gic.is_active(0, 30), "physical PPI 30 deactivated");
    assert_eq!(
        d.gic.ich_read(0, IchReg::Lr(0)).unwrap() >> ICH_LR_STATE_SHIFT,
        0
    );
    assert_eq!(d.gic.ich_read(0, IchReg::Elrsr).unwrap(), 0b1111);
}

/// ICV_CTLR_EL1.EOImode = 1: ICV_EOIR only drops the priority, the LR stays active until
/// ICV_DIR (B6 with list registers).
#[test]
fn eoimode_1_guest_deactivates_a_list_register_with_icv_dir() {
    let mut d = rig();
    d.gic.icv_write(0, IcvReg::Ctlr, ICC_CTLR_EOIMODE).unwrap();
    assert_ne!(d.gic.ich_read(0, IchReg::Vmcr).unwrap() & ICH_VMCR_VEOIM, 0);
    d.gic.ich_write(0, IchReg::Lr(1), lr(1, 33, 0x60)).unwrap();
    assert_eq!(d.gic.icv_read(0, IcvReg::Iar1).unwrap(), 33);
    d.gic.icv_write(0, IcvReg::Eoir1, 33).unwrap();
    assert_eq!(
        d.gic.icv_read(0, IcvReg::Rpr).unwrap(),
        0xFF,
        "priority dropped"
    );
    let st = d.gic.ich_read(0, IchReg::Lr(1)).unwrap() >> ICH_LR_STATE_SHIFT;
    assert_eq!(st, ICH_LR_STATE_ACTIVE, "still active");
    d.gic.icv_write(0, IcvReg::Dir, 33).unwrap();
    assert_eq!(
        d.gic.ich_read(0, IchReg::Lr(1)).unwrap() >> ICH_LR_STATE_SHIFT,
        0
    );
}

/// ICH_HCR_EL2.EOIcount counts deactivations that match no list register; with LRENPIE the
/// maintenance interrupt (PPI 25) is raised while it is non-zero (ICH_MISR_EL2.LRENP).
#[test]
fn eoi_for_no_list_register_counts_and_raises_lrenp_maintenance() {
    let mut d = rig();
    d.gic
        .ich_write(0, IchReg::Hcr, ICH_HCR_EN | ICH_HCR_LRENPIE)
        .unwrap();
    // The guest had interrupt 50 active when the hypervisor evicted its LR.
    d.gic.ich_write(0, IchReg::Ap1r0, 1 << (0x80 >> 3)).unwrap();
    assert!(!maintenance_pending(&d, 0));
    d.gic.icv_write(0, IcvReg::Eoir1, 50).unwrap();
    let hcr = d.gic.ich_read(0, IchReg::Hcr).unwrap();
    assert_eq!((hcr >> ICH_HCR_EOICOUNT_SHIFT) & 0x1F, 1);
    assert_eq!(d.gic.ich_read(0, IchReg::Misr).unwrap(), ICH_MISR_LRENP);
    assert!(maintenance_pending(&d, 0));
    assert_eq!(d.iar(0), ICH_MAINTENANCE_PPI);
    // The hypervisor handles it and clears EOIcount: the level drops, so the EOI leaves
    // nothing pending (the maintenance interrupt is level-sensitive).
    d.gic
        .ich_write(0, IchReg::Hcr, ICH_HCR_EN | ICH_HCR_LRENPIE)
        .unwrap();
    d.eoi(0, ICH_MAINTENANCE_PPI);
    assert!(!maintenance_pending(&d, 0));
    assert!(d.drain(0).is_empty());
}

/// ICH_LR.EOI = 1 asks for maintenance when the guest deactivates (ICH_EISR_EL2,
/// ICH_MISR_EL2.EOI); UIE raises it when at most one LR is valid (ICH_MISR_EL2.U); NPIE
/// when none is pending (ICH_MISR_EL2.NP).
#[test]
fn eoi_underflow_and_no_pending_maintenance_follow_the_list_registers() {
    let mut d = rig();
    d.gic
        .ich_write(0, IchReg::Lr(0), lr(1, 40, 0x80) | ICH_LR_EOI)
        .unwrap();
    d.gic.ich_write(0, IchReg::Lr(1), lr(1, 41, 0x80)).unwrap();
    d.gic
        .ich_write(0, IchReg::Hcr, ICH_HCR_EN | ICH_HCR_UIE | ICH_HCR_NPIE)
        .unwrap();
    assert_eq!(
        d.gic.ich_read(0, IchReg::Misr).unwrap(),
        0,
        "2 valid, 2 pending"
    );
    assert_eq!(d.gic.icv_read(0, IcvReg::Iar1).unwrap(), 40);
    d.gic.icv_write(0, IcvReg::Eoir1, 40).unwrap();
    assert_eq!(d.gic.ich_read(0, IchReg::Eisr).unwrap(), 0b1);
    assert_eq!(d.gic.ich_read(0, IchReg::Elrsr).unwrap(), 0b1100);
    assert_eq!(
        d.gic.ich_read(0, IchReg::Misr).unwrap(),
        ICH_MISR_EOI | ICH_MISR_U
    );
    assert!(maintenance_pending(&d, 0));
    d.gic.ich_write(0, IchReg::Lr(0), 0).unwrap();
    assert_eq!(d.gic.icv_read(0, IcvReg::Iar1).unwrap(), 41);
    assert_eq!(
        d.gic.ich_read(0, IchReg::Misr).unwrap(),
        ICH_MISR_U | ICH_MISR_NP
    );
    d.gic.ich_write(0, IchReg::Hcr, ICH_HCR_EN).unwrap();
    assert!(!maintenance_pending(&d, 0));
}

/// ICV_BPR1_EL1 groups priorities for preemption (IHI 0069, "Priority grouping"), as the
/// physical interface does.
#[test]
fn icv_binary_point_groups_priorities_for_preemption() {
    let mut d = rig();
    d.gic.ich_write(0, IchReg::Lr(0), lr(1, 60, 0x80)).unwrap();
    d.gic.ich_write(0, IchReg::Lr(1), lr(1, 61, 0x88)).unwrap();
    assert_eq!(d.gic.icv_read(0, IcvReg::Iar1).unwrap(), 60);
    // BPR1 = 3: group priority bits [7:3]; 0x88 preempts nothing at 0x80.
    assert!(!d.gic.virq_line(0));
    d.gic.ich_write(0, IchReg::Lr(2), lr(1, 62, 0x78)).unwrap();
    assert!(d.gic.virq_line(0), "0x78 preempts 0x80");
    d.gic.icv_write(0, IcvReg::Bpr1, 4).unwrap();
    assert_eq!(d.gic.icv_read(0, IcvReg::Bpr1).unwrap(), 4);
    // BPR1 = 4: group priority bits [7:4]: 0x78 -> 0x70 still preempts 0x80.
    assert!(d.gic.virq_line(0));
    d.gic.icv_write(0, IcvReg::Bpr1, 7).unwrap();
    // BPR1 = 7: bit 7 only: 0x78 -> 0x00 preempts.
    assert!(d.gic.virq_line(0));
    d.gic.icv_write(0, IcvReg::Bpr1, 0).unwrap();
    assert_eq!(
        d.gic.icv_read(0, IcvReg::Bpr1).unwrap(),
        3,
        "clamped to the minimum"
    );
    assert_eq!(d.gic.icv_read(0, IcvReg::Ap1r0).unwrap(), 1 << (0x80 >> 3));
}

/// ICH_* state is part of the model's saved state: a whole-model save/restore in the middle
/// of a guest's interrupt (one LR active, one pending) loses nothing.
#[test]
fn ich_state_survives_a_model_save_restore() {
    let mut d = rig();
    d.gic.ich_write(0, IchReg::Lr(0), lr(1, 70, 0x80)).unwrap();
    d.gic.ich_write(0, IchReg::Lr(1), lr(1, 71, 0x90)).unwrap();
    assert_eq!(d.gic.icv_read(0, IcvReg::Iar1).unwrap(), 70);
    let st = d.gic.state();
    let json = serde_json::to_string(&st).unwrap();
    let back: gic::GicState = serde_json::from_str(&json).unwrap();
    let mut g = Gic::from_state(&back, d.gic.mem().clone()).unwrap();
    assert_eq!(g.icv_read(0, IcvReg::Rpr).unwrap(), 0x80);
    g.icv_write(0, IcvReg::Eoir1, 70).unwrap();
    assert_eq!(g.icv_read(0, IcvReg::Iar1).unwrap(), 71);
    g.icv_write(0, IcvReg::Eoir1, 71).unwrap();
    assert_eq!(g.icv_read(0, IcvReg::Iar1).unwrap(), INTID_SPURIOUS as u64);
    assert_eq!(g.ich_read(0, IchReg::Elrsr).unwrap(), 0b1111);
}
