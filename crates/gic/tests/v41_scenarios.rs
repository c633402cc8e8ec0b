//! GICv4.1 scenarios against the model, written the way Arm's bare-metal GICv4.1 example
//! (`main_vsgi.c`, `main_vlpi.c`) drives a GIC: raw MMIO, raw commands, raw tables.

use gic::regs::*;
use gic::{
    Gic, GicConfig, GuestMem, IccReg, IcvReg, ItsCommand, ItsCommandError, MmioError,
    UnpredictableEvent, V41Config, VecMem,
};

const RAM: u64 = 0x4000_0000;
const RAM_SIZE: usize = 8 << 20;
const PROP: u64 = RAM;
const VPE_TABLE: u64 = RAM + 0x8_0000;
const PEND: u64 = RAM + 0x10_0000; // + pe * 64 KiB
const VPT: u64 = RAM + 0x20_0000; // + vpe * 64 KiB
const VCONF: u64 = RAM + 0x30_0000;
const ITT: u64 = RAM + 0x40_0000;
const L2: u64 = RAM + 0x50_0000;
const GICD: u64 = 0x0800_0000;
const V41_GICR: u64 = gic::config::V41_GICR_BASE;
const DOORBELL: u32 = 8192;
const VLPI: u32 = 8200;

fn dt(its: usize) -> u64 {
    RAM + 0x1_0000 + its as u64 * 0x3_0000
}
fn ct(its: usize) -> u64 {
    dt(its) + 0x1_0000
}
fn cmdq(its: usize) -> u64 {
    dt(its) + 0x2_0000
}

struct Rig {
    gic: Gic<VecMem>,
    slot: Vec<u64>,
}

impl Rig {
    fn with(cfg: GicConfig) -> Rig {
        let mut r = Rig {
            slot: vec![0; cfg.its.len()],
            gic: Gic::new(cfg, VecMem::new(RAM, RAM_SIZE)).expect("valid config"),
        };
        r.boot();
        r
    }

    fn new(pes: usize, its: usize) -> Rig {
        Rig::with(GicConfig::virt_v41(pes, its))
    }

    fn rd(&self, pe: usize) -> u64 {
        self.gic.config().rd_base(pe)
    }
    fn vlpi(&self, pe: usize) -> u64 {
        self.rd(pe) + GICR_VLPI_OFFSET
    }
    fn its(&self, i: usize) -> u64 {
        self.gic.config().its[i].base
    }
    fn w32(&mut self, a: u64, v: u32) {
        self.gic.write(a, 4, v as u64).expect("write");
    }
    fn w64(&mut self, a: u64, v: u64) {
        self.gic.write(a, 8, v).expect("write");
    }
    fn r32(&mut self, a: u64) -> u32 {
        self.gic.read(a, 4).expect("read") as u32
    }
    fn r64(&mut self, a: u64) -> u64 {
        self.gic.read(a, 8).expect("read")
    }

    /// Host side: LPIs on every RD (doorbell LPI enabled, priority 0x80), ITSs with device,
    /// collection and vPE tables, collections 0..n mapped to PE n, every RD's VPROPBASER
    /// pointing at the shared vPE table.
    fn boot(&mut self) {
        let pes = self.gic.config().num_pes();
        let nits = self.gic.config().its.len();
        self.w32(GICD + GICD_CTLR, GICD_CTLR_ENABLE_G1);
        let prop = vec![0x80 | LPI_PROP_GROUP1 | LPI_PROP_ENABLE; 0x1_0000];
        self.gic.mem_mut().write(PROP, &prop).unwrap();
        for pe in 0..pes {
            let rd = self.rd(pe);
            self.w32(rd + GICR_WAKER, 0);
            self.w64(rd + GICR_PROPBASER, PROP | 15);
            self.w64(rd + GICR_PENDBASER, PEND + pe as u64 * 0x1_0000);
            self.w32(rd + GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
            self.gic.icc_write(pe, IccReg::Pmr, 0xff).unwrap();
            self.gic.icc_write(pe, IccReg::Igrpen1, 1).unwrap();
            let vl = self.vlpi(pe);
            self.w64(
                vl + GICR_VPROPBASER,
                VPROPBASER_VALID | (2 << VPROPBASER_PAGE_SIZE_SHIFT) | VPE_TABLE,
            );
        }
        for i in 0..nits {
            let b = self.its(i);
            self.w64(b + GITS_BASER, GITS_BASER_VALID | (2 << 8) | dt(i));
            self.w64(b + GITS_BASER + 8, GITS_BASER_VALID | (2 << 8) | ct(i));
            self.w64(b + GITS_BASER + 16, GITS_BASER_VALID | (2 << 8) | VPE_TABLE);
            self.w64(b + GITS_CBASER, GITS_CBASER_VALID | cmdq(i));
            self.w32(b + GITS_CTLR, GITS_CTLR_ENABLED);
            let maps: Vec<ItsCommand> = (0..pes)
                .map(|pe| ItsCommand::Mapc {
                    icid: pe as u16,
                    rdbase: pe as u64,
                    valid: true,
                })
                .collect();
            self.cmds(i, &maps);
        }
    }

    fn cmds(&mut self, its: usize, cmds: &[ItsCommand]) {
        for c in cmds {
            let at = cmdq(its) + self.slot[its] * 32;
            self.gic.mem_mut().write(at, &c.to_bytes()).unwrap();
            self.slot[its] = (self.slot[its] + 1) % 128;
        }
        let b = self.its(its);
        self.w64(b + GITS_CWRITER, self.slot[its] * 32);
    }

    fn errors(&self, its: usize) -> u64 {
        self.gic.its_errors(its).map_or(0, |e| e.1)
    }

    fn last_error(&self, its: usize) -> Option<ItsCommandError> {
        self.gic
            .its_errors(its)
            .and_then(|(v, _)| v.last().map(|r| r.error))
    }

    fn vmapp(&mut self, its: usize, vpeid: u32, pe: usize, alloc: bool) {
        self.cmds(
            its,
            &[ItsCommand::Vmapp {
                vpeid,
                rdbase: pe as u64,
                valid: true,
                alloc,
                ptz: true,
                vconf: VCONF,
                default_db: DOORBELL + vpeid,
                vpt: VPT + vpeid as u64 * 0x1_0000,
                vpt_size: 13,
            }],
        );
    }

    /// VMAPP -> INVDB -> SYNC -> VSYNC -> VSGI(enable, prio 0, group 1) for every SGI, as the
    /// Arm example does.
    fn arm_example_map(&mut self, vpeid: u32, pe: usize) {
        self.vmapp(0, vpeid, pe, true);
        let mut c = vec![
            ItsCommand::Invdb { vpeid },
            ItsCommand::Sync { rdbase: pe as u64 },
            ItsCommand::Vsync { vpeid },
        ];
        for sgi in 0..16 {
            c.push(ItsCommand::Vsgi {
                vpeid,
                sgi,
                enable: true,
                clear: false,
                group1: true,
                priority: 0,
            });
        }
        self.cmds(0, &c);
    }

    fn make_resident(&mut self, pe: usize, vpeid: u32) {
        let a = self.vlpi(pe) + GICR_VPENDBASER;
        self.w64(a, VPENDBASER_VALID | VPENDBASER_VGRP1EN | vpeid as u64);
        while self.r64(a) & VPENDBASER_DIRTY != 0 {}
    }

    /// Returns PendingLast as read back after Dirty clears.
    fn make_nonresident(&mut self, pe: usize, db: bool) -> bool {
        let a = self.vlpi(pe) + GICR_VPENDBASER;
        let v = self.r64(a);
        let mut n = v & !VPENDBASER_VALID & !VPENDBASER_PENDING_LAST;
        if db {
            n |= VPENDBASER_DB;
        } else {
            n |= VPENDBASER_PENDING_LAST;
        }
        self.w64(a, n);
        loop {
            let r = self.r64(a);
            if r & VPENDBASER_DIRTY == 0 {
                return r & VPENDBASER_PENDING_LAST != 0;
            }
        }
    }

    fn sgir(&mut self, its: usize, vpeid: u32, sgi: u32) {
        let a = self.its(its) + GITS_SGIR;
        self.w64(a, ((vpeid as u64) << 32) | sgi as u64);
    }

    fn guest_enable(&mut self, pe: usize) {
        self.gic.icv_write(pe, IcvReg::Pmr, 0xff).unwrap();
        self.gic.icv_write(pe, IcvReg::Igrpen1, 1).unwrap();
    }

    /// Acknowledges and EOIs every virtual interrupt the resident vPE has.
    fn guest_drain(&mut self, pe: usize) -> Vec<u32> {
        let mut got = Vec::new();
        loop {
            let i = self.gic.icv_read(pe, IcvReg::Iar1).unwrap() as u32;
            if i == INTID_SPURIOUS {
                return got;
            }
            got.push(i);
            self.gic.icv_write(pe, IcvReg::Eoir1, i as u64).unwrap();
        }
    }

    /// Acknowledges every physical interrupt on `pe`.
    fn host_drain(&mut self, pe: usize) -> Vec<u32> {
        let mut got = Vec::new();
        loop {
            let i = self.gic.icc_read(pe, IccReg::Iar1).unwrap() as u32;
            if i == INTID_SPURIOUS {
                return got;
            }
            got.push(i);
            self.gic.icc_write(pe, IccReg::Eoir1, i as u64).unwrap();
        }
    }

    fn map_vlpi(&mut self, vpeid: u32, event: u32, vintid: u32) {
        let vconf = [LPI_PROP_GROUP1 | LPI_PROP_ENABLE | 0x40; 1];
        self.gic
            .mem_mut()
            .write(VCONF + (vintid - LPI_BASE) as u64, &vconf)
            .unwrap();
        self.cmds(
            0,
            &[
                ItsCommand::Mapd {
                    device: 1,
                    size: 7,
                    itt: ITT,
                    valid: true,
                },
                ItsCommand::Vmapti {
                    device: 1,
                    event,
                    vpeid,
                    vintid,
                    db: INTID_NO_DOORBELL,
                },
                ItsCommand::Vinvall { vpeid },
                ItsCommand::Vsync { vpeid },
            ],
        );
    }

    fn events(&self) -> Vec<UnpredictableEvent> {
        self.gic.unpredictable_events().0
    }
}

#[test]
fn feature_registers_advertise_gicv41_and_v3_configs_do_not() {
    let mut r = Rig::new(2, 1);
    let t2 = r.r32(GICD + GICD_TYPER2);
    assert_eq!(t2 & GICD_TYPER2_VID_MASK, 15, "16 vPEID bits");
    assert_ne!(t2 & GICD_TYPER2_VIL, 0);
    assert_ne!(t2 & GICD_TYPER2_NASSGICAP, 0);
    let rd = r.rd(0);
    let t = r.r64(rd + GICR_TYPER);
    for (bit, name) in [
        (GICR_TYPER_VLPIS, "VLPIS"),
        (GICR_TYPER_RVPEID, "RVPEID"),
        (GICR_TYPER_DIRTY, "Dirty"),
        (GICR_TYPER_VSGI, "VSGI"),
    ] {
        assert_ne!(t & bit, 0, "GICR_TYPER.{name}");
    }
    assert_eq!((t >> GICR_TYPER_COMMONLPIAFF_SHIFT) & 3, 0);
    assert_eq!(
        r.rd(1) - r.rd(0),
        GICR_STRIDE_V4,
        "GICv4 redistributor stride"
    );
    let its = r.its(0);
    let gt = r.r64(its + GITS_TYPER);
    for (bit, name) in [
        (GITS_TYPER_VIRTUAL, "Virtual"),
        (GITS_TYPER_VMOVP, "VMOVP"),
        (GITS_TYPER_VSGI, "VSGI"),
        (GITS_TYPER_VMAPP, "VMAPP"),
    ] {
        assert_ne!(gt & bit, 0, "GITS_TYPER.{name}");
    }
    assert_eq!((gt >> GITS_TYPER_SVPET_SHIFT) & 3, 1);
    let b2 = r.r64(its + GITS_BASER + 16);
    assert_eq!((b2 >> GITS_BASER_TYPE_SHIFT) & 7, GITS_BASER_TYPE_VPE);
    assert_eq!((b2 >> GITS_BASER_ENTRY_SIZE_SHIFT) & 0x1F, 31);
    let vp = r.r64(r.vlpi(0) + GICR_VPROPBASER);
    assert_eq!(
        (vp >> VPROPBASER_ENTRY_SIZE_SHIFT) & 7,
        3,
        "32-byte vPE entries"
    );
    assert_eq!(r.r32(its + GITS_CTLR) & GITS_CTLR_IMDE, GITS_CTLR_IMDE);

    let mut v3 = Gic::new(GicConfig::virt(2), VecMem::new(RAM, 1 << 20)).unwrap();
    assert_eq!(v3.read(GICD + GICD_TYPER2, 4).unwrap(), 0);
    assert_eq!(v3.read(0x0808_0000 + GITS_BASER + 16, 8).unwrap(), 0);
    let t = v3.read(0x080A_0000 + GICR_TYPER, 8).unwrap();
    assert_eq!(t & (GICR_TYPER_VLPIS | GICR_TYPER_RVPEID), 0);
    assert!(v3.icv_read(0, IcvReg::Iar1).is_err());
    // A GICv3 ITS rejects virtual opcodes.
    v3.write(0x0808_0000 + GITS_CBASER, 8, GITS_CBASER_VALID | RAM)
        .unwrap();
    v3.write(0x0808_0000 + GITS_CTLR, 4, 1).unwrap();
    v3.mem_mut()
        .write(RAM, &ItsCommand::Vsync { vpeid: 0 }.to_bytes())
        .unwrap();
    v3.write(0x0808_0000 + GITS_CWRITER, 8, 32).unwrap();
    assert_eq!(
        v3.its_errors(0).unwrap().0[0].error,
        ItsCommandError::UnknownCommand(CMD_VSYNC)
    );
}

#[test]
fn vsgi_to_a_resident_vpe_reaches_the_virtual_cpu_interface_without_the_hypervisor() {
    let mut r = Rig::new(2, 1);
    r.arm_example_map(0, 1);
    assert_eq!(r.errors(0), 0);
    r.make_resident(1, 0);
    r.guest_enable(1);
    assert!(!r.gic.virq_line(1));
    r.sgir(0, 0, 5);
    assert!(r.gic.virq_line(1), "vIRQ asserted for the resident vPE");
    assert!(
        !r.gic.irq_line(1),
        "no physical interrupt: no hypervisor involvement"
    );
    assert_eq!(r.gic.icv_read(1, IcvReg::Hppir1).unwrap(), 5);
    assert_eq!(r.gic.icv_read(1, IcvReg::Iar1).unwrap(), 5);
    // No active state: the same vSGI can be pending again before the EOI.
    r.sgir(0, 0, 5);
    assert_eq!(r.gic.icv_read(1, IcvReg::Hppir1).unwrap(), 5);
    assert_eq!(r.gic.icv_read(1, IcvReg::Rpr).unwrap(), 0);
    r.gic.icv_write(1, IcvReg::Eoir1, 5).unwrap();
    assert_eq!(r.guest_drain(1), vec![5]);
    assert!(!r.gic.virq_line(1));
    assert_eq!(r.gic.v41_stats().unwrap().virtual_acks, 2);
    assert_eq!(r.host_drain(1), Vec::<u32>::new());
}

#[test]
fn vsgi_and_vlpi_for_a_nonresident_vpe_raise_the_default_doorbell_exactly_once() {
    let mut r = Rig::new(2, 1);
    r.arm_example_map(3, 0);
    r.map_vlpi(3, 0, VLPI);
    r.make_resident(0, 3);
    r.guest_enable(0);
    assert!(
        !r.make_nonresident(0, true),
        "nothing pending: PendingLast = 0"
    );
    r.sgir(0, 3, 2);
    r.sgir(0, 3, 7);
    r.gic.send_msi(0, 1, 0).unwrap();
    assert_eq!(
        r.host_drain(0),
        vec![DOORBELL + 3],
        "one doorbell for three interrupts"
    );
    r.sgir(0, 3, 9);
    assert_eq!(r.host_drain(0), Vec::<u32>::new(), "at most once per phase");
    assert_eq!(r.gic.vpe(3).unwrap().doorbells, 1);
    // The vLPI is in the VPT in memory while the vPE is away.
    let mut b = [0u8];
    r.gic
        .mem()
        .read(VPT + 3 * 0x1_0000 + (VLPI / 8) as u64, &mut b)
        .unwrap();
    assert_ne!(b[0] & (1 << (VLPI % 8)), 0);
    r.make_resident(0, 3);
    let mut got = r.guest_drain(0);
    got.sort();
    assert_eq!(
        got,
        vec![2, 7, 9, VLPI],
        "everything delivered once resident"
    );
    r.gic
        .mem()
        .read(VPT + 3 * 0x1_0000 + (VLPI / 8) as u64, &mut b)
        .unwrap();
    assert_eq!(
        b[0] & (1 << (VLPI % 8)),
        0,
        "acknowledge clears the VPT bit"
    );
    // A second non-residency phase re-arms the doorbell.
    assert!(!r.make_nonresident(0, true));
    r.sgir(0, 3, 1);
    assert_eq!(r.host_drain(0), vec![DOORBELL + 3]);
    assert_eq!(r.gic.v41_stats().unwrap().doorbells, 2);
}

#[test]
fn no_doorbell_unless_requested_and_pending_last_reports_pending_work() {
    let mut r = Rig::new(1, 1);
    r.arm_example_map(1, 0);
    r.make_resident(0, 1);
    r.guest_enable(0);
    assert!(
        !r.make_nonresident(0, false),
        "PendingLast reports the real pending state"
    );
    r.sgir(0, 1, 4);
    assert!(r.host_drain(0).is_empty(), "no doorbell without DB");
    r.make_resident(0, 1);
    // Pending before the vPE leaves: PendingLast = 1 and no doorbell in this phase.
    assert!(r.make_nonresident(0, true));
    r.sgir(0, 1, 6);
    assert!(r.host_drain(0).is_empty());
    r.make_resident(0, 1);
    assert_eq!(r.guest_drain(0), vec![4, 6]);
}

#[test]
fn dirty_reads_back_for_busy_reads_polls_without_gating_delivery() {
    let cfg = GicConfig {
        v41: Some(V41Config {
            busy_reads: 3,
            ..V41Config::default()
        }),
        ..GicConfig::virt_v41(1, 1)
    };
    let mut r = Rig::with(cfg);
    r.arm_example_map(2, 0);
    r.sgir(0, 2, 3);
    let a = r.vlpi(0) + GICR_VPENDBASER;
    r.w64(a, VPENDBASER_VALID | VPENDBASER_VGRP1EN | 2);
    r.guest_enable(0);
    assert!(r.gic.virq_line(0), "Dirty does not gate delivery (B2)");
    let polls = (0..10)
        .take_while(|_| r.r64(a) & VPENDBASER_DIRTY != 0)
        .count();
    assert_eq!(polls, 3);
    assert!(r.gic.virq_line(0));
    assert_eq!(r.r64(a) & 0xFFFF, 2, "vPEID recorded");
}

#[test]
fn vsgipendr_busy_protocol_reads_pending_vsgis() {
    let mut r = Rig::new(2, 1);
    r.arm_example_map(4, 1);
    r.sgir(0, 4, 0);
    r.sgir(0, 4, 15);
    let vl = r.vlpi(1);
    r.w32(vl + GICR_VSGIR, 4);
    assert_eq!(r.r32(vl + GICR_VSGIR), 4);
    assert_eq!(
        r.r32(vl + GICR_VSGIPENDR),
        VSGIPENDR_BUSY,
        "first read busy"
    );
    assert_eq!(r.r32(vl + GICR_VSGIPENDR), 0x8001);
    // VSGI Clear = 1 clears the pending bit and leaves the configuration alone.
    r.cmds(
        0,
        &[ItsCommand::Vsgi {
            vpeid: 4,
            sgi: 15,
            enable: false,
            clear: true,
            group1: false,
            priority: 0,
        }],
    );
    r.w32(vl + GICR_VSGIR, 4);
    let _ = r.r32(vl + GICR_VSGIPENDR);
    assert_eq!(r.r32(vl + GICR_VSGIPENDR), 0x0001);
    assert_eq!(r.gic.vpe(4).unwrap().sgi_enable, 0xFFFF);
    assert!(r.events().is_empty());
}

#[test]
fn register_invalidation_with_v1_reloads_vlpi_config_and_detects_busy_and_wrong_rd() {
    let mut cfg = GicConfig::virt_v41(4, 1);
    cfg.pe_affinities = vec![0x000, 0x001, 0x100, 0x101];
    if let Some(v) = cfg.v41.as_mut() {
        v.common_lpi_aff = 3; // groups {0,1} and {2,3}
    }
    let mut r = Rig::with(cfg);
    r.arm_example_map(5, 0);
    r.map_vlpi(5, 0, VLPI);
    // Disable the vLPI in VConf and invalidate through PE 1 (same group as PE 0).
    r.gic
        .mem_mut()
        .write(VCONF + (VLPI - LPI_BASE) as u64, &[LPI_PROP_GROUP1])
        .unwrap();
    let rd1 = r.rd(1);
    r.w64(
        rd1 + GICR_INVLPIR,
        GICR_INV_V | (5 << GICR_INV_VPEID_SHIFT) | VLPI as u64,
    );
    // Second invalidation while SYNCR.Busy: CONSTRAINED UNPREDICTABLE, ignored.
    r.w64(rd1 + GICR_INVALLR, GICR_INV_V | (5 << GICR_INV_VPEID_SHIFT));
    assert_eq!(
        r.events(),
        vec![UnpredictableEvent::InvalidateWhileBusy { rd: 1, vpeid: 5 }]
    );
    assert_eq!(r.r32(rd1 + GICR_SYNCR), GICR_SYNCR_BUSY);
    assert_eq!(r.r32(rd1 + GICR_SYNCR), 0);
    r.make_resident(0, 5);
    r.guest_enable(0);
    r.gic.send_msi(0, 1, 0).unwrap();
    assert!(r.guest_drain(0).is_empty(), "disabled by INVLPIR");
    // An invalidation on an RD of the other group names a vPE not mapped there.
    let rd2 = r.rd(2);
    r.gic
        .mem_mut()
        .write(VCONF + (VLPI - LPI_BASE) as u64, &[LPI_PROP_GROUP1 | 1])
        .unwrap();
    r.w64(rd2 + GICR_INVALLR, GICR_INV_V | (5 << GICR_INV_VPEID_SHIFT));
    assert_eq!(
        r.events().last(),
        Some(&UnpredictableEvent::InvalidateWrongRd { rd: 2, vpeid: 5 })
    );
    assert!(r.guest_drain(0).is_empty());
    let rd0 = r.rd(0);
    r.w64(rd0 + GICR_INVALLR, GICR_INV_V | (5 << GICR_INV_VPEID_SHIFT));
    while r.r32(rd0 + GICR_SYNCR) & GICR_SYNCR_BUSY != 0 {}
    assert_eq!(r.guest_drain(0), vec![VLPI]);
}

#[test]
fn vsgipendr_read_racing_a_vmovp_to_another_group_is_detected() {
    let mut cfg = GicConfig::virt_v41(4, 1);
    cfg.pe_affinities = vec![0x000, 0x001, 0x100, 0x101];
    if let Some(v) = cfg.v41.as_mut() {
        v.common_lpi_aff = 3;
    }
    let mut r = Rig::with(cfg);
    r.arm_example_map(6, 0);
    r.sgir(0, 6, 1);
    let vl0 = r.vlpi(0);
    r.w32(vl0 + GICR_VSGIR, 6);
    // The vPE moves to the other group between the VSGIR write and the VSGIPENDR read.
    r.cmds(
        0,
        &[ItsCommand::Vmovp {
            vpeid: 6,
            rdbase: 2,
            seq: 0,
            its_list: 0,
            db_valid: true,
            default_db: DOORBELL + 6,
        }],
    );
    assert_eq!(r.gic.v41_stats().unwrap().vmovps, 1);
    while r.r32(vl0 + GICR_VSGIPENDR) & VSGIPENDR_BUSY != 0 {}
    assert_eq!(
        r.events(),
        vec![UnpredictableEvent::VsgiReadWrongRd { rd: 0, vpeid: 6 }]
    );
    // Asking the right RD works.
    let vl2 = r.vlpi(2);
    r.w32(vl2 + GICR_VSGIR, 6);
    while r.r32(vl2 + GICR_VSGIPENDR) & VSGIPENDR_BUSY != 0 {}
    assert_eq!(r.r32(vl2 + GICR_VSGIPENDR), 0b10);
    // Residency outside the mapped group is recorded.
    r.make_resident(0, 6);
    assert_eq!(
        r.events().last(),
        Some(&UnpredictableEvent::ResidentOnOtherRd {
            rd: 0,
            vpeid: 6,
            mapped: 2
        })
    );
}

#[test]
fn malformed_virtual_commands_and_accesses_give_typed_errors() {
    let mut r = Rig::new(1, 1);
    // vPE table is 64 KiB flat = 2048 entries.
    r.vmapp(0, 4096, 0, true);
    assert_eq!(r.last_error(0), Some(ItsCommandError::VpeOutOfRange(4096)));
    r.cmds(0, &[ItsCommand::Vsync { vpeid: 7 }]);
    assert_eq!(r.last_error(0), Some(ItsCommandError::UnmappedVpe(7)));
    r.cmds(
        0,
        &[ItsCommand::Vmapp {
            vpeid: 1,
            rdbase: 0,
            valid: true,
            alloc: true,
            ptz: true,
            vconf: VCONF,
            default_db: DOORBELL,
            vpt: VPT,
            vpt_size: 3,
        }],
    );
    assert!(matches!(
        r.last_error(0),
        Some(ItsCommandError::IntIdOutOfRange(_))
    ));
    r.vmapp(0, 1, 0, true);
    r.cmds(
        0,
        &[
            ItsCommand::Mapd {
                device: 2,
                size: 3,
                itt: ITT,
                valid: true,
            },
            ItsCommand::Vmapti {
                device: 2,
                event: 0,
                vpeid: 1,
                vintid: 100,
                db: INTID_NO_DOORBELL,
            },
        ],
    );
    assert_eq!(r.last_error(0), Some(ItsCommandError::IntIdOutOfRange(100)));
    r.cmds(
        0,
        &[ItsCommand::Vmapti {
            device: 2,
            event: 0,
            vpeid: 9,
            vintid: VLPI,
            db: INTID_NO_DOORBELL,
        }],
    );
    assert_eq!(r.last_error(0), Some(ItsCommandError::UnmappedVpe(9)));
    r.sgir(0, 9, 1);
    assert_eq!(r.last_error(0), Some(ItsCommandError::UnmappedVpe(9)));
    let its = r.its(0);
    assert_eq!(
        r.gic.write(its + GITS_SGIR, 4, 1),
        Err(MmioError::WidthNotPermitted {
            offset: GITS_SGIR,
            width: 4
        })
    );
    // Random garbage in the command queue never panics.
    for op in 0x20..0x30u64 {
        let at = cmdq(0) + r.slot[0] * 32;
        let junk = [op | 0xFFFF_FF00, u64::MAX, u64::MAX, u64::MAX];
        let mut b = [0u8; 32];
        for (i, w) in junk.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        r.gic.mem_mut().write(at, &b).unwrap();
        r.slot[0] += 1;
        r.w64(its + GITS_CWRITER, r.slot[0] * 32);
    }
    // ICV access with nothing resident.
    assert!(r.gic.icv_read(0, IcvReg::Iar1).is_err());
    assert!(r.gic.icv_write(0, IcvReg::Iar1, 0).is_err());
}

#[test]
fn residency_misuse_is_recorded_not_fatal() {
    let mut r = Rig::new(2, 1);
    let a = r.vlpi(0) + GICR_VPENDBASER;
    r.w64(a, VPENDBASER_VALID | 77);
    assert_eq!(
        r.events(),
        vec![UnpredictableEvent::ResidentUnmapped { rd: 0, vpeid: 77 }]
    );
    assert_eq!(r.gic.resident_vpe(0), None);
    r.arm_example_map(1, 0);
    r.make_resident(0, 1);
    r.w64(a, VPENDBASER_VALID | VPENDBASER_VGRP0EN | 1);
    assert_eq!(
        r.events().last(),
        Some(&UnpredictableEvent::VpendbaserWhileValid { rd: 0 })
    );
    let b = r.vlpi(1) + GICR_VPENDBASER;
    r.w64(b, VPENDBASER_VALID | 1);
    assert_eq!(
        r.events().last(),
        Some(&UnpredictableEvent::ResidentTwice { rd: 1, vpeid: 1 })
    );
    let vp = r.vlpi(0) + GICR_VPROPBASER;
    r.w64(vp, 0);
    assert_eq!(
        r.events().last(),
        Some(&UnpredictableEvent::VpropbaserWhileResident { rd: 0 })
    );
    // Unmapping a resident vPE forces it out.
    r.cmds(
        0,
        &[ItsCommand::Vmapp {
            vpeid: 1,
            rdbase: 0,
            valid: false,
            alloc: true,
            ptz: false,
            vconf: 0,
            default_db: 0,
            vpt: 0,
            vpt_size: 0,
        }],
    );
    assert_eq!(r.gic.resident_vpe(0), None);
    assert!(r.gic.vpe(1).is_none());
}

#[test]
fn indirect_vpe_tables_need_level2_pages_in_the_its_and_every_rd() {
    let mut cfg = GicConfig::virt_v41(1, 1);
    cfg.its[0].base = 0x0808_0000;
    let mut g = Gic::new(cfg, VecMem::new(RAM, RAM_SIZE)).unwrap();
    // 4 KiB pages, 128 entries per level-2 page; L1 at VPE_TABLE.
    let its = 0x0808_0000;
    let vl = g.config().rd_base(0) + GICR_VLPI_OFFSET;
    g.write(
        vl + GICR_VPROPBASER,
        8,
        VPROPBASER_VALID | VPROPBASER_INDIRECT | VPE_TABLE,
    )
    .unwrap();
    g.write(
        its + GITS_BASER + 16,
        8,
        GITS_BASER_VALID | GITS_BASER_INDIRECT | VPE_TABLE,
    )
    .unwrap();
    g.write(its + GITS_CBASER, 8, GITS_CBASER_VALID | cmdq(0))
        .unwrap();
    g.write(its + GITS_CTLR, 4, 1).unwrap();
    let vmapp = ItsCommand::Vmapp {
        vpeid: 300,
        rdbase: 0,
        valid: true,
        alloc: true,
        ptz: true,
        vconf: VCONF,
        default_db: DOORBELL,
        vpt: VPT,
        vpt_size: 13,
    };
    g.mem_mut().write(cmdq(0), &vmapp.to_bytes()).unwrap();
    g.write(its + GITS_CWRITER, 8, 32).unwrap();
    assert_eq!(
        g.its_errors(0).unwrap().0[0].error,
        ItsCommandError::VpeOutOfRange(300)
    );
    // Populate L1 entry 300 / 128 = 2.
    g.mem_mut()
        .write(VPE_TABLE + 16, &(L2 | GITS_L1E_VALID).to_le_bytes())
        .unwrap();
    g.mem_mut().write(cmdq(0) + 32, &vmapp.to_bytes()).unwrap();
    g.write(its + GITS_CWRITER, 8, 64).unwrap();
    assert_eq!(g.its_errors(0).unwrap().1, 1);
    let mut e = [0u8; 8];
    g.mem().read(L2 + (300 % 128) * 32, &mut e).unwrap();
    assert_eq!(u64::from_le_bytes(e) & VPTE_VALID, 1, "entry written");
    g.write(vl + GICR_VPENDBASER, 8, VPENDBASER_VALID | 300)
        .unwrap();
    assert_eq!(g.resident_vpe(0), Some(300));
    assert_eq!(g.unpredictable_events().1, 0);
}

#[test]
fn two_itss_sharing_the_vpe_table_both_deliver_vsgis() {
    let mut r = Rig::new(2, 2);
    r.arm_example_map(8, 1);
    r.vmapp(1, 8, 1, false);
    assert_eq!(r.errors(1), 0);
    assert_eq!(r.gic.vpe(8).unwrap().its_mapped, 0b11);
    r.make_resident(1, 8);
    r.guest_enable(1);
    r.sgir(0, 8, 1);
    r.sgir(1, 8, 2);
    assert_eq!(r.guest_drain(1), vec![1, 2]);
    // Alloc = 0 on the last unmap keeps the vPE; Alloc = 1 frees it.
    r.make_nonresident(1, false);
    let unmap = |alloc| ItsCommand::Vmapp {
        vpeid: 8,
        rdbase: 0,
        valid: false,
        alloc,
        ptz: false,
        vconf: 0,
        default_db: 0,
        vpt: 0,
        vpt_size: 0,
    };
    r.cmds(1, &[unmap(false)]);
    assert_eq!(r.gic.vpe(8).unwrap().its_mapped, 0b01);
    r.sgir(1, 8, 3);
    assert_eq!(r.last_error(1), Some(ItsCommandError::UnmappedVpe(8)));
    r.cmds(0, &[unmap(true)]);
    assert!(r.gic.vpe(8).is_none());
}

#[test]
fn vmovp_without_the_vmovp_feature_needs_the_its_in_the_itslist() {
    let cfg = GicConfig {
        v41: Some(V41Config {
            vmovp: false,
            ..V41Config::default()
        }),
        ..GicConfig::virt_v41(2, 2)
    };
    let mut r = Rig::with(cfg);
    assert_eq!(r.r64(r.its(0) + GITS_TYPER) & GITS_TYPER_VMOVP, 0);
    let its1 = r.its(1);
    // Linux assigns ITS numbers by write and read-back while the ITS is disabled.
    r.w32(its1 + GITS_CTLR, 0);
    r.w32(
        its1 + GITS_CTLR,
        GITS_CTLR_ENABLED | (1 << GITS_CTLR_ITS_NUMBER_SHIFT),
    );
    assert_eq!((r.r32(its1 + GITS_CTLR) >> 4) & 0xF, 1, "ITS_Number");
    r.arm_example_map(2, 0);
    r.vmapp(1, 2, 0, false);
    let vmovp = |list| ItsCommand::Vmovp {
        vpeid: 2,
        rdbase: 1,
        seq: 1,
        its_list: list,
        db_valid: true,
        default_db: DOORBELL,
    };
    r.cmds(0, &[vmovp(0b10)]);
    assert_eq!(r.last_error(0), Some(ItsCommandError::NotInItsList(0b10)));
    r.cmds(0, &[vmovp(0b11)]);
    r.cmds(1, &[vmovp(0b11)]);
    assert_eq!(r.errors(1), 0);
    assert_eq!(r.gic.vpe(2).unwrap().rd, 1);
}

#[test]
fn nassgireq_changes_only_while_the_distributor_is_disabled_and_drops_sgi_active_state() {
    let mut r = Rig::new(2, 1);
    r.w32(GICD + GICD_CTLR, GICD_CTLR_ENABLE_G1 | GICD_CTLR_NASSGIREQ);
    assert_eq!(r.r32(GICD + GICD_CTLR) & GICD_CTLR_NASSGIREQ, 0);
    assert_eq!(r.events(), vec![UnpredictableEvent::NassgireqWhileEnabled]);
    r.w32(GICD + GICD_CTLR, 0);
    r.w32(GICD + GICD_CTLR, GICD_CTLR_NASSGIREQ);
    r.w32(GICD + GICD_CTLR, GICD_CTLR_NASSGIREQ | GICD_CTLR_ENABLE_G1);
    assert_ne!(r.r32(GICD + GICD_CTLR) & GICD_CTLR_NASSGIREQ, 0);
    let sgi = r.rd(1) + GICR_SGI_OFFSET;
    r.w32(sgi + GICR_IGROUPR0, 0xFFFF);
    r.w32(sgi + GICR_ISENABLER0, 0xFFFF);
    r.gic.icc_write(0, IccReg::Sgi1r, (3 << 24) | 0b10).unwrap();
    assert_eq!(r.gic.icc_read(1, IccReg::Iar1).unwrap(), 3);
    assert!(!r.gic.is_active(1, 3), "no active state with nASSGIreq");
    // With nASSGIcap = 0 the bit is RES0.
    let cfg = GicConfig {
        v41: Some(V41Config {
            nassgi_cap: false,
            ..V41Config::default()
        }),
        ..GicConfig::virt_v41(1, 1)
    };
    let mut g = Gic::new(cfg, VecMem::new(RAM, 1 << 20)).unwrap();
    g.write(GICD + GICD_CTLR, 4, GICD_CTLR_NASSGIREQ as u64)
        .unwrap();
    assert_eq!(
        g.read(GICD + GICD_CTLR, 4).unwrap() as u32 & GICD_CTLR_NASSGIREQ,
        0
    );
    assert_eq!(
        g.read(GICD + GICD_TYPER2, 4).unwrap() as u32 & GICD_TYPER2_NASSGICAP,
        0
    );
}

#[test]
fn save_restore_keeps_vpes_residency_and_doorbell_state() {
    let mut r = Rig::new(2, 1);
    r.arm_example_map(1, 0);
    r.arm_example_map(2, 1);
    r.make_resident(0, 1);
    r.guest_enable(0);
    r.make_resident(1, 2);
    assert!(!r.make_nonresident(1, true));
    let st = r.gic.state();
    let json = serde_json::to_string(&st).unwrap();
    let back: gic::GicState = serde_json::from_str(&json).unwrap();
    let mut g = Gic::from_state(&back, r.gic.mem().clone()).unwrap();
    assert_eq!(g.state(), st);
    g.write(r.its(0) + GITS_SGIR, 8, (2 << 32) | 4).unwrap();
    assert_eq!(g.icc_read(1, IccReg::Iar1).unwrap(), (DOORBELL + 2) as u64);
    g.write(r.its(0) + GITS_SGIR, 8, (1 << 32) | 4).unwrap();
    assert_eq!(g.icv_read(0, IcvReg::Iar1).unwrap(), 4);
    // A v4.1 state does not restore into a GICv3 model.
    let mut bad = st.clone();
    bad.config = GicConfig::virt(2);
    assert!(Gic::from_state(&bad, r.gic.mem().clone()).is_err());
}

#[test]
fn vmovi_moves_pending_vlpis_and_discard_unmaps() {
    let mut r = Rig::new(1, 1);
    r.arm_example_map(1, 0);
    r.arm_example_map(2, 0);
    r.map_vlpi(1, 0, VLPI);
    r.gic.send_msi(0, 1, 0).unwrap();
    assert!(r.gic.vpe(1).unwrap().vlpi_pending.contains(&VLPI));
    r.cmds(
        0,
        &[
            ItsCommand::Vmovi {
                device: 1,
                event: 0,
                vpeid: 2,
                db_valid: false,
                db: 0,
            },
            ItsCommand::Vinvall { vpeid: 2 },
        ],
    );
    assert_eq!(r.errors(0), 0);
    assert!(r.gic.vpe(1).unwrap().vlpi_pending.is_empty());
    r.make_resident(0, 2);
    r.guest_enable(0);
    assert_eq!(r.guest_drain(0), vec![VLPI]);
    r.cmds(
        0,
        &[ItsCommand::Discard {
            device: 1,
            event: 0,
        }],
    );
    r.gic.send_msi(0, 1, 0).unwrap_err();
    assert!(r.guest_drain(0).is_empty());
    // Physical mapping back on the same event works (host LPI).
    r.cmds(
        0,
        &[
            ItsCommand::Mapti {
                device: 1,
                event: 0,
                intid: 9000,
                icid: 0,
            },
            ItsCommand::Int {
                device: 1,
                event: 0,
            },
        ],
    );
    // Neither vPE had been resident when its vLPI became pending (the MSI for vPE 1, VMOVI
    // for vPE 2), so each rang its default doorbell once (B0).
    assert_eq!(r.host_drain(0), vec![DOORBELL + 1, DOORBELL + 2, 9000]);
}

#[test]
fn individual_doorbells_fire_per_vlpi_unless_nid() {
    let mut r = Rig::new(1, 1);
    r.arm_example_map(1, 0);
    r.map_vlpi(1, 0, VLPI);
    r.cmds(
        0,
        &[ItsCommand::Vmovi {
            device: 1,
            event: 0,
            vpeid: 1,
            db_valid: true,
            db: 8500,
        }],
    );
    assert_eq!(r.errors(0), 0);
    r.gic.send_msi(0, 1, 0).unwrap();
    // The individual doorbell, and the default one of a vPE never made resident (B0).
    assert_eq!(r.host_drain(0), vec![DOORBELL + 1, 8500]);
    assert_eq!(r.gic.v41_stats().unwrap().individual_doorbells, 1);
    let cfg = GicConfig {
        v41: Some(V41Config {
            no_individual_doorbells: true,
            ..V41Config::default()
        }),
        ..GicConfig::virt_v41(1, 1)
    };
    let mut r = Rig::with(cfg);
    r.arm_example_map(1, 0);
    r.map_vlpi(1, 0, VLPI);
    r.cmds(
        0,
        &[ItsCommand::Vmovi {
            device: 1,
            event: 0,
            vpeid: 1,
            db_valid: true,
            db: 8500,
        }],
    );
    assert_eq!(
        r.last_error(0),
        Some(ItsCommandError::IndividualDoorbell(8500))
    );
}

#[test]
fn virtual_commands_round_trip_through_their_encoding() {
    let cmds = [
        ItsCommand::Vmapp {
            vpeid: 0x1234,
            rdbase: 7,
            valid: true,
            alloc: true,
            ptz: false,
            vconf: 0x4433_0000,
            default_db: 8193,
            vpt: 0x5566_0000,
            vpt_size: 15,
        },
        ItsCommand::Vmapti {
            device: 9,
            event: 3,
            vpeid: 4,
            vintid: 8300,
            db: 1023,
        },
        ItsCommand::Vmapi {
            device: 9,
            event: 8192,
            vpeid: 4,
            db: 1023,
        },
        ItsCommand::Vmovi {
            device: 1,
            event: 2,
            vpeid: 3,
            db_valid: true,
            db: 8194,
        },
        ItsCommand::Vmovp {
            vpeid: 5,
            rdbase: 2,
            seq: 9,
            its_list: 3,
            db_valid: true,
            default_db: 8195,
        },
        ItsCommand::Vsync { vpeid: 6 },
        ItsCommand::Vinvall { vpeid: 7 },
        ItsCommand::Invdb { vpeid: 8 },
        ItsCommand::Vsgi {
            vpeid: 9,
            sgi: 14,
            enable: true,
            clear: false,
            group1: true,
            priority: 0xA0,
        },
    ];
    for c in cmds {
        assert_eq!(ItsCommand::decode_v41(c.encode()), c);
    }
    // Field positions from the architecture: VSGI priority in DW0[23:20], SGI in DW0[35:32].
    let dw = ItsCommand::Vsgi {
        vpeid: 1,
        sgi: 3,
        enable: true,
        clear: false,
        group1: false,
        priority: 0x50,
    }
    .encode();
    assert_eq!(dw[0], 0x23 | (1 << 8) | (5 << 20) | (3 << 32));
    assert_eq!(dw[1], 1 << 32);
}

#[test]
fn enabling_a_pending_vlpi_by_invalidation_rings_an_armed_doorbell_once() {
    let mut r = Rig::new(1, 1);
    r.arm_example_map(1, 0);
    r.map_vlpi(1, 0, VLPI);
    r.gic
        .mem_mut()
        .write(VCONF + (VLPI - LPI_BASE) as u64, &[LPI_PROP_GROUP1])
        .unwrap();
    let rd = r.rd(0);
    let inv = GICR_INV_V | (1 << GICR_INV_VPEID_SHIFT) | VLPI as u64;
    r.w64(rd + GICR_INVLPIR, inv);
    while r.r32(rd + GICR_SYNCR) & GICR_SYNCR_BUSY != 0 {}
    r.make_resident(0, 1);
    assert!(!r.make_nonresident(0, true));
    r.gic.send_msi(0, 1, 0).unwrap();
    assert!(r.host_drain(0).is_empty(), "a disabled vLPI does not ring");
    r.gic
        .mem_mut()
        .write(
            VCONF + (VLPI - LPI_BASE) as u64,
            &[LPI_PROP_GROUP1 | LPI_PROP_ENABLE],
        )
        .unwrap();
    r.w64(rd + GICR_INVLPIR, inv);
    assert_eq!(r.host_drain(0), vec![DOORBELL + 1]);
    while r.r32(rd + GICR_SYNCR) & GICR_SYNCR_BUSY != 0 {}
    r.w64(rd + GICR_INVLPIR, inv);
    assert!(r.host_drain(0).is_empty(), "once per phase");
}

#[test]
fn qtest_front_end_reaches_the_v41_registers_and_the_virtual_cpu_interface() {
    use gic::qtest::{QtestConfig, QtestSession};
    let cfg = QtestConfig {
        gic: GicConfig::virt_v41(2, 1),
        ..QtestConfig::default()
    };
    let mut s = QtestSession::new(&cfg).unwrap();
    assert_eq!(
        s.handle_line("readl 0x0800000c").as_deref(),
        Some("OK 0x000000000000018f"),
        "GICD_TYPER2: nASSGIcap, VIL, VID = 15"
    );
    assert_eq!(s.handle_line("gic_virq 1").as_deref(), Some("OK 0"));
    let r = s.handle_line("gic_icv_read 0 iar1").unwrap_or_default();
    assert!(r.starts_with("ERR"), "{r}");
    let r = s.handle_line("gic_icv_read 0 bogus").unwrap_or_default();
    assert!(r.starts_with("ERR unknown register"), "{r}");
    let r = s.handle_line("gic_virq 9").unwrap_or_default();
    assert!(r.starts_with("ERR"), "{r}");
    // The VLPI frame of PE 1 is at RD_base + 128 KiB with the 256 KiB stride.
    let vprop = V41_GICR + GICR_STRIDE_V4 + GICR_VLPI_OFFSET + GICR_VPROPBASER;
    assert_eq!(
        s.handle_line(&format!("readq {vprop:#x}")).as_deref(),
        Some("OK 0x1800000000000000"),
        "Entry_Size = 3"
    );
}

#[test]
fn icv_groups_priorities_and_preemption_follow_the_resident_vpe() {
    let mut r = Rig::new(1, 1);
    r.vmapp(0, 1, 0, true);
    let vsgi = |sgi, group1, priority| ItsCommand::Vsgi {
        vpeid: 1,
        sgi,
        enable: true,
        clear: false,
        group1,
        priority,
    };
    r.cmds(
        0,
        &[
            vsgi(1, true, 0x80),
            vsgi(2, true, 0x40),
            vsgi(3, false, 0x20),
        ],
    );
    // vGrp0En and vGrp1En both set.
    let a = r.vlpi(0) + GICR_VPENDBASER;
    r.w64(
        a,
        VPENDBASER_VALID | VPENDBASER_VGRP0EN | VPENDBASER_VGRP1EN | 1,
    );
    while r.r64(a) & VPENDBASER_DIRTY != 0 {}
    r.guest_enable(0);
    r.gic.icv_write(0, IcvReg::Igrpen0, 1).unwrap();
    r.sgir(0, 1, 1);
    assert_eq!(r.gic.icv_read(0, IcvReg::Iar1).unwrap(), 1);
    assert_eq!(r.gic.icv_read(0, IcvReg::Rpr).unwrap(), 0x80);
    // A higher-priority vSGI preempts; an equal or lower one waits.
    r.sgir(0, 1, 2);
    assert!(r.gic.virq_line(0));
    assert_eq!(r.gic.icv_read(0, IcvReg::Iar1).unwrap(), 2);
    r.sgir(0, 1, 1);
    assert!(!r.gic.virq_line(0), "0x80 cannot preempt 0x40");
    // Group 0 goes to the virtual FIQ and ICV_IAR0.
    r.sgir(0, 1, 3);
    assert!(r.gic.vfiq_line(0));
    assert_eq!(r.gic.icv_read(0, IcvReg::Hppir0).unwrap(), 3);
    assert_eq!(
        r.gic.icv_read(0, IcvReg::Iar1).unwrap(),
        INTID_SPURIOUS as u64
    );
    assert_eq!(r.gic.icv_read(0, IcvReg::Iar0).unwrap(), 3);
    r.gic.icv_write(0, IcvReg::Eoir0, 3).unwrap();
    r.gic.icv_write(0, IcvReg::Eoir1, 2).unwrap();
    r.gic.icv_write(0, IcvReg::Eoir1, 1).unwrap();
    assert_eq!(r.gic.icv_read(0, IcvReg::Rpr).unwrap(), 0xFF);
    assert_eq!(r.guest_drain(0), vec![1]);
    // PMR masks; ICV_IGRPEN1 = 0 masks Group 1.
    r.gic.icv_write(0, IcvReg::Pmr, 0x40).unwrap();
    r.sgir(0, 1, 1);
    assert!(!r.gic.virq_line(0));
    r.gic.icv_write(0, IcvReg::Pmr, 0xFF).unwrap();
    r.gic.icv_write(0, IcvReg::Igrpen1, 0).unwrap();
    assert!(!r.gic.virq_line(0));
    r.gic.icv_write(0, IcvReg::Igrpen1, 1).unwrap();
    assert!(r.gic.virq_line(0));
    // vGrp1En = 0 in VPENDBASER hides Group 1 whatever the guest enables.
    r.make_nonresident(0, false);
    r.w64(a, VPENDBASER_VALID | 1);
    while r.r64(a) & VPENDBASER_DIRTY != 0 {}
    assert!(!r.gic.virq_line(0));
    assert_eq!(
        r.gic.icv_read(0, IcvReg::Pmr).unwrap(),
        0xF8,
        "ICV state followed the vPE"
    );
}

#[test]
fn invdb_makes_a_doorbell_configuration_change_visible() {
    let mut r = Rig::new(1, 1);
    r.arm_example_map(1, 0);
    // The host disables the doorbell LPI; without INVDB the cached configuration still
    // has it enabled.
    r.gic
        .mem_mut()
        .write(
            PROP + (DOORBELL + 1 - LPI_BASE) as u64,
            &[0x80 | LPI_PROP_GROUP1],
        )
        .unwrap();
    r.cmds(0, &[ItsCommand::Invdb { vpeid: 1 }]);
    r.make_resident(0, 1);
    assert!(!r.make_nonresident(0, true));
    r.sgir(0, 1, 0);
    assert!(r.gic.is_pending(0, DOORBELL + 1), "the doorbell is raised");
    assert!(
        r.host_drain(0).is_empty(),
        "but masked by its configuration"
    );
    r.gic
        .mem_mut()
        .write(
            PROP + (DOORBELL + 1 - LPI_BASE) as u64,
            &[0x80 | LPI_PROP_GROUP1 | 1],
        )
        .unwrap();
    r.cmds(0, &[ItsCommand::Invdb { vpeid: 1 }]);
    assert_eq!(r.host_drain(0), vec![DOORBELL + 1]);
}

/// Arm's `configureLPI(rd0, 8192, ENABLE, 0)`: the doorbell's configuration byte, made
/// visible at RD0 by a register invalidation.
fn arm_configure_doorbell(r: &mut Rig) {
    r.gic
        .mem_mut()
        .write(
            PROP + (DOORBELL - LPI_BASE) as u64,
            &[LPI_PROP_GROUP1 | LPI_PROP_ENABLE],
        )
        .unwrap();
    let rd0 = r.rd(0);
    r.w64(rd0 + GICR_INVLPIR, DOORBELL as u64);
}

/// Arm's `makeResident(rd, vpeid, g0 = 1, g1 = 1)`: one VPENDBASER write, then poll Dirty.
fn arm_make_resident(r: &mut Rig, pe: usize, vpeid: u32) {
    let a = r.vlpi(pe) + GICR_VPENDBASER;
    r.w64(
        a,
        VPENDBASER_VALID | VPENDBASER_VGRP0EN | VPENDBASER_VGRP1EN | vpeid as u64,
    );
    while r.r64(a) & VPENDBASER_DIRTY != 0 {}
}

/// B0 (issue 16): Arm's `main_vsgi.c` in its published order. vPE 0 is mapped (VMAPP Alloc,
/// V = 1) and never made resident; GITS_SGIR makes vSGI 0 pending; the example waits for the
/// default doorbell (pINTID 8192) before making the vPE resident on RD1. IHI 0069 (GICv4.1,
/// "Default doorbells"): a vPE that is not resident on any PE and has a pending, enabled
/// interrupt of an enabled group generates its default doorbell; a vPE that has never been
/// scheduled has no PendingLast phase that could have suppressed it.
#[test]
fn arm_example_vsgi_in_published_order_rings_the_doorbell_of_a_never_resident_vpe() {
    let mut r = Rig::new(2, 1);
    arm_configure_doorbell(&mut r);
    r.cmds(
        0,
        &[
            ItsCommand::Vmapp {
                vpeid: 0,
                rdbase: 0,
                valid: true,
                alloc: true,
                ptz: false,
                vconf: VCONF,
                default_db: DOORBELL,
                vpt: VPT,
                vpt_size: 14,
            },
            ItsCommand::Invdb { vpeid: 0 },
            ItsCommand::Sync { rdbase: 0 },
            ItsCommand::Vsync { vpeid: 0 },
            ItsCommand::Vsgi {
                vpeid: 0,
                sgi: 0,
                enable: true,
                clear: false,
                group1: true,
                priority: 0,
            },
        ],
    );
    r.sgir(0, 0, 0);
    assert_eq!(r.errors(0), 0);
    assert_eq!(
        r.host_drain(0),
        vec![DOORBELL],
        "the example waits for this doorbell on RD0"
    );
    arm_make_resident(&mut r, 1, 0);
    r.guest_enable(1);
    assert!(r.gic.virq_line(1));
    assert_eq!(r.guest_drain(1), vec![0], "vSGI 0 delivered on RD1");
    assert_eq!(r.gic.vpe(0).unwrap().doorbells, 1);
}

/// B0 (issue 16): Arm's `main_vlpi.c` in its published order: MAPD, VMAPP, INVDB, VMAPTI
/// (no individual doorbell), VSYNC, INV, INT to a never-resident vPE, wait for the default
/// doorbell, then make the vPE resident on RD1 (same CommonLPIAff group) and take the vLPI.
#[test]
fn arm_example_vlpi_in_published_order_rings_the_doorbell_of_a_never_resident_vpe() {
    let mut r = Rig::new(2, 1);
    // configureVLPI(VCONFIG_TABLE, 8192, ENABLE, 0)
    r.gic
        .mem_mut()
        .write(VCONF, &[LPI_PROP_GROUP1 | LPI_PROP_ENABLE])
        .unwrap();
    arm_configure_doorbell(&mut r);
    r.cmds(
        0,
        &[
            ItsCommand::Mapd {
                device: 0,
                size: 1,
                itt: ITT,
                valid: true,
            },
            ItsCommand::Vmapp {
                vpeid: 0,
                rdbase: 0,
                valid: true,
                alloc: true,
                ptz: false,
                vconf: VCONF,
                default_db: DOORBELL,
                vpt: VPT,
                vpt_size: 14,
            },
            ItsCommand::Invdb { vpeid: 0 },
            ItsCommand::Vmapti {
                device: 0,
                event: 0,
                vpeid: 0,
                vintid: 8192,
                db: INTID_NO_DOORBELL,
            },
            ItsCommand::Vsync { vpeid: 0 },
            ItsCommand::Inv {
                device: 0,
                event: 0,
            },
            ItsCommand::Int {
                device: 0,
                event: 0,
            },
        ],
    );
    assert_eq!(r.errors(0), 0);
    assert_eq!(r.host_drain(0), vec![DOORBELL], "the example waits for it");
    arm_make_resident(&mut r, 1, 0);
    r.guest_enable(1);
    assert_eq!(r.guest_drain(1), vec![8192]);
}

/// B2 (issue 16): GICR_VPENDBASER.Dirty reports that the redistributor is still parsing the
/// VPT (IHI 0069, GICR_VPENDBASER.Dirty, and GICR_TYPER.Dirty: software *may* poll it); the
/// parse completes by itself. Delivery to a resident vPE cannot depend on software reading
/// the register: a hypervisor that never polls Dirty still gets its interrupts.
#[test]
fn a_resident_vpe_gets_interrupts_without_anyone_reading_vpendbaser() {
    let cfg = GicConfig {
        v41: Some(V41Config {
            busy_reads: 3,
            ..V41Config::default()
        }),
        ..GicConfig::virt_v41(1, 1)
    };
    let mut r = Rig::with(cfg);
    r.arm_example_map(2, 0);
    r.sgir(0, 2, 3);
    let a = r.vlpi(0) + GICR_VPENDBASER;
    r.w64(a, VPENDBASER_VALID | VPENDBASER_VGRP1EN | 2);
    r.guest_enable(0);
    assert!(r.gic.virq_line(0), "pending before residency");
    r.sgir(0, 2, 4);
    assert_eq!(r.guest_drain(0), vec![3, 4]);
}

/// B3 (issue 16): IHI 0069, GICR_VPENDBASER.PendingLast and the default doorbell only
/// consider interrupts that could be forwarded: pending, enabled, and of a group the vPE
/// enables (vGrp0En / vGrp1En). A Group 1 vSGI with vGrp1En = 0 neither sets PendingLast
/// nor rings the doorbell; a Group 0 one with vGrp0En = 1 does.
#[test]
fn pending_last_and_doorbells_ignore_groups_the_vpe_disables() {
    let mut r = Rig::new(1, 1);
    r.arm_example_map(1, 0);
    r.cmds(
        0,
        &[ItsCommand::Vsgi {
            vpeid: 1,
            sgi: 7,
            enable: true,
            clear: false,
            group1: false,
            priority: 0,
        }],
    );
    let a = r.vlpi(0) + GICR_VPENDBASER;
    r.w64(a, VPENDBASER_VALID | VPENDBASER_VGRP0EN | 1);
    while r.r64(a) & VPENDBASER_DIRTY != 0 {}
    r.sgir(0, 1, 5);
    assert!(
        !r.make_nonresident(0, true),
        "PendingLast = 0: only a Group 1 vSGI with vGrp1En = 0"
    );
    r.sgir(0, 1, 6);
    assert!(r.host_drain(0).is_empty(), "no doorbell for Group 1");
    r.sgir(0, 1, 7);
    assert_eq!(r.host_drain(0), vec![DOORBELL + 1], "Group 0 rings");
}

/// B5 (issue 16): IHI 0069, VMAPP: VPT_size is DW3\[4:0\] (number of vINTID bits - 1);
/// DW3\[15:5\] are RES0 and must not change the size.
#[test]
fn vmapp_vpt_size_ignores_reserved_bits_of_dw3() {
    let mut r = Rig::new(1, 1);
    let mut bytes = ItsCommand::Vmapp {
        vpeid: 4,
        rdbase: 0,
        valid: true,
        alloc: true,
        ptz: true,
        vconf: VCONF,
        default_db: DOORBELL,
        vpt: VPT,
        vpt_size: 13,
    }
    .to_bytes();
    bytes[24] |= 0xE0; // DW3[7:5]
    let mut dw = [0u64; 4];
    for (i, w) in dw.iter_mut().enumerate() {
        *w = u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
    }
    assert!(matches!(
        ItsCommand::decode_v41(dw),
        ItsCommand::Vmapp { vpt_size: 13, .. }
    ));
    let at = cmdq(0) + r.slot[0] * 32;
    r.gic.mem_mut().write(at, &bytes).unwrap();
    r.slot[0] += 1;
    let (b, w) = (r.its(0), r.slot[0] * 32);
    r.w64(b + GITS_CWRITER, w);
    assert_eq!(r.errors(0), 0);
    assert_eq!(r.gic.vpe(4).unwrap().vpt_bits, 14);
}

/// B6 (issue 16): IHI 0069, ICV_CTLR_EL1.EOImode is RW: with EOImode = 1 a write to
/// ICV_EOIR1_EL1 only drops the running priority and ICV_DIR_EL1 deactivates.
#[test]
fn icv_ctlr_eoimode_is_writable_and_icv_dir_exists() {
    let mut r = Rig::new(1, 1);
    r.arm_example_map(1, 0);
    r.make_resident(0, 1);
    r.guest_enable(0);
    r.gic.icv_write(0, IcvReg::Ctlr, ICC_CTLR_EOIMODE).unwrap();
    assert_ne!(
        r.gic.icv_read(0, IcvReg::Ctlr).unwrap() & ICC_CTLR_EOIMODE,
        0
    );
    r.sgir(0, 1, 9);
    assert_eq!(r.gic.icv_read(0, IcvReg::Iar1).unwrap(), 9);
    r.gic.icv_write(0, IcvReg::Eoir1, 9).unwrap();
    assert_eq!(
        r.gic.icv_read(0, IcvReg::Rpr).unwrap(),
        0xFF,
        "priority dropped"
    );
    r.gic.icv_write(0, IcvReg::Dir, 9).unwrap();
    r.gic.icv_write(0, IcvReg::Ctlr, 0).unwrap();
    assert_eq!(
        r.gic.icv_read(0, IcvReg::Ctlr).unwrap() & ICC_CTLR_EOIMODE,
        0
    );
}
