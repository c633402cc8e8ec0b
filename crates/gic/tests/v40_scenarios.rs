//! GICv4.0 scenarios against the model alone (no QEMU needed): what the differential tests
//! cannot observe through qtest — direct vLPIs reaching the guest's ICV interface, the
//! typed command errors, save/restore of a resident GICv4.0 vPE — and the configuration
//! checks.

use gic::regs::*;
use gic::{
    ConfigError, Gic, GicConfig, GicVersion, GuestMem, IcvReg, ItsCommand, ItsCommandError,
    V41Config, VecMem,
};

const RAM: u64 = 0x4000_0000;
const RAM_SIZE: usize = 8 << 20;
const PROP: u64 = RAM;
const DT: u64 = RAM + 0x1_0000;
const CT: u64 = RAM + 0x2_0000;
const CMDQ: u64 = RAM + 0x3_0000;
const VPET: u64 = RAM + 0x4_0000;
const PEND: u64 = RAM + 0x10_0000; // + pe * 64 KiB
const VPT: u64 = RAM + 0x20_0000; // + vpe * 64 KiB
const VCONF: u64 = RAM + 0x30_0000;
const ITT: u64 = RAM + 0x40_0000;
const DB: u32 = 8300;

fn byte(m: &VecMem, a: u64) -> u8 {
    let mut b = [0u8];
    m.read(a, &mut b).expect("guest memory");
    b[0]
}

struct Rig {
    gic: Gic<VecMem>,
    slot: u64,
}

impl Rig {
    fn new(pes: usize) -> Rig {
        let cfg = GicConfig::virt_v40(pes);
        let mut r = Rig {
            gic: Gic::new(cfg, VecMem::new(RAM, RAM_SIZE)).expect("valid GICv4.0 config"),
            slot: 0,
        };
        r.gic.mem_mut().write(PROP, &[0xa1; 256]).expect("prop");
        // vINTIDs 8192..8199 enabled at priority 0x40, 8200.. disabled.
        r.gic.mem_mut().write(VCONF, &[0x41; 8]).expect("vconf");
        for pe in 0..pes {
            let rd = r.rd(pe);
            r.w64(rd + GICR_PROPBASER, PROP | 15);
            r.w64(rd + GICR_PENDBASER, PEND + pe as u64 * 0x1_0000);
            r.gic.write(rd + GICR_CTLR, 4, 1).expect("EnableLPIs");
        }
        let its = r.gic.config().its[0].base;
        r.w64(its + GITS_BASER, (1 << 63) | (2 << 8) | DT);
        r.w64(its + GITS_BASER + 8, (1 << 63) | (2 << 8) | CT);
        r.w64(its + GITS_BASER + 16, (1 << 63) | (2 << 8) | VPET);
        r.w64(its + GITS_CBASER, (1 << 63) | CMDQ);
        r.gic.write(its + GITS_CTLR, 4, 1).expect("enable ITS");
        r.cmds(&[ItsCommand::Mapd {
            device: 0,
            size: 7,
            itt: ITT,
            valid: true,
        }]);
        r
    }

    fn rd(&self, pe: usize) -> u64 {
        self.gic.config().rd_base(pe)
    }
    fn w64(&mut self, a: u64, v: u64) {
        self.gic.write(a, 8, v).expect("write");
    }
    fn r64(&self, a: u64) -> u64 {
        self.gic.read(a, 8).expect("read")
    }

    fn cmds(&mut self, cmds: &[ItsCommand]) {
        for c in cmds {
            self.gic
                .mem_mut()
                .write(CMDQ + self.slot * 32, &c.to_bytes())
                .expect("queue");
            self.slot += 1;
        }
        let its = self.gic.config().its[0].base;
        self.w64(its + GITS_CWRITER, self.slot * 32);
    }

    fn errors(&self) -> Vec<ItsCommandError> {
        let (recs, _) = self.gic.its_errors(0).expect("ITS 0");
        recs.iter().map(|r| r.error).collect()
    }

    fn vmapp(&mut self, vpeid: u32, rd: u64, size: u8) {
        self.cmds(&[ItsCommand::Vmapp {
            vpeid,
            rdbase: rd,
            valid: true,
            alloc: false,
            ptz: false,
            vconf: 0,
            default_db: 0,
            vpt: VPT + vpeid as u64 * 0x1_0000,
            vpt_size: size,
        }]);
    }

    fn schedule(&mut self, pe: usize, vpeid: u32) {
        let v = self.rd(pe) + GICR_VLPI_OFFSET;
        self.w64(v + GICR_VPROPBASER, VCONF | 15);
        self.w64(
            v + GICR_VPENDBASER,
            (VPT + vpeid as u64 * 0x1_0000) | VPENDBASER_PENDING_LAST | VPENDBASER_VALID,
        );
    }

    fn vpt_bit(&self, vpeid: u32, vintid: u32) -> bool {
        let a = VPT + vpeid as u64 * 0x1_0000 + (vintid / 8) as u64;
        byte(self.gic.mem(), a) & (1 << (vintid % 8)) != 0
    }
}

#[test]
fn a_resident_v40_vpe_takes_direct_vlpis_through_icv_and_the_vpt_bit_clears() {
    let mut r = Rig::new(2);
    r.vmapp(3, 1, 15);
    r.cmds(&[
        ItsCommand::Vmapti {
            device: 0,
            event: 0,
            vpeid: 3,
            vintid: 8194,
            db: DB,
        },
        ItsCommand::Vmapti {
            device: 0,
            event: 1,
            vpeid: 3,
            vintid: 8192,
            db: DB,
        },
    ]);
    r.schedule(1, 3);
    assert_eq!(r.gic.resident_vpe(1), Some(3), "found by its VPT address");
    assert_eq!(r.gic.resident_vpe(0), None);
    r.gic.icv_write(1, IcvReg::Pmr, 0xff).unwrap();
    r.gic.icv_write(1, IcvReg::Igrpen1, 1).unwrap();
    assert!(!r.gic.virq_line(1));
    r.cmds(&[ItsCommand::Int {
        device: 0,
        event: 0,
    }]);
    r.cmds(&[ItsCommand::Int {
        device: 0,
        event: 1,
    }]);
    assert!(
        r.gic.virq_line(1),
        "vLPIs of the resident vPE reach the ICV interface"
    );
    assert!(r.vpt_bit(3, 8194) && r.vpt_bit(3, 8192));
    // No doorbell while resident.
    let pend1 = byte(r.gic.mem(), PEND + 0x1_0000 + (DB / 8) as u64);
    assert_eq!(pend1 & (1 << (DB % 8)), 0);
    // Equal priorities: the lower vINTID first.
    assert_eq!(r.gic.icv_read(1, IcvReg::Iar1).unwrap(), 8192);
    assert!(!r.vpt_bit(3, 8192), "acknowledging clears the VPT bit");
    r.gic.icv_write(1, IcvReg::Eoir1, 8192).unwrap();
    assert_eq!(r.gic.icv_read(1, IcvReg::Iar1).unwrap(), 8194);
    r.gic.icv_write(1, IcvReg::Eoir1, 8194).unwrap();
    assert_eq!(
        r.gic.icv_read(1, IcvReg::Iar1).unwrap(),
        INTID_SPURIOUS as u64
    );
    // Non-resident: PendingLast 0 (nothing pending), the next INT rings the doorbell at RD 1.
    let v = r.rd(1) + GICR_VLPI_OFFSET + GICR_VPENDBASER;
    r.w64(v, VPT + 3 * 0x1_0000);
    assert_eq!(r.r64(v) & VPENDBASER_PENDING_LAST, 0);
    r.cmds(&[ItsCommand::Int {
        device: 0,
        event: 0,
    }]);
    let pend1 = byte(r.gic.mem(), PEND + 0x1_0000 + (DB / 8) as u64);
    assert_ne!(pend1 & (1 << (DB % 8)), 0, "individual doorbell");
    assert_eq!(r.gic.vpe(3).map(|v| v.individual_doorbells), Some(1));
    assert_eq!(
        r.gic.vpe(3).map(|v| v.doorbells),
        Some(0),
        "no default doorbell in v4.0"
    );
}

#[test]
fn v40_command_errors_are_typed() {
    let mut r = Rig::new(1);
    r.vmapp(1, 0, 15);
    r.cmds(&[
        ItsCommand::Vmapti {
            device: 0,
            event: 0,
            vpeid: 1,
            vintid: 0x1_0000,
            db: 1023,
        },
        ItsCommand::Vmapti {
            device: 0,
            event: 1,
            vpeid: 1,
            vintid: 8192,
            db: 7,
        },
        // GICv4.1 opcodes.
        ItsCommand::Invdb { vpeid: 1 },
        ItsCommand::Vsgi {
            vpeid: 1,
            sgi: 1,
            enable: true,
            clear: false,
            group1: true,
            priority: 0,
        },
        // A vPE nobody mapped: VMAPTI is accepted, INT is not.
        ItsCommand::Vmapti {
            device: 0,
            event: 2,
            vpeid: 9,
            vintid: 8192,
            db: 1023,
        },
        ItsCommand::Int {
            device: 0,
            event: 2,
        },
        ItsCommand::Vsync { vpeid: 9 },
    ]);
    assert_eq!(
        r.errors(),
        vec![
            ItsCommandError::IntIdOutOfRange(0x1_0000),
            ItsCommandError::IntIdOutOfRange(7),
            ItsCommandError::UnknownCommand(0x2E),
            ItsCommandError::UnknownCommand(0x23),
            ItsCommandError::UnmappedVpe(9),
            ItsCommandError::UnmappedVpe(9),
        ]
    );
    // No GITS_SGIR frame (GICv4.1): the ITS is two 64 KiB frames, and at virt's layout the
    // redistributors follow right after it.
    assert_eq!(r.gic.config().its_size(), 2 * FRAME_SIZE);
}

#[test]
fn a_resident_v40_vpe_survives_save_and_restore() {
    let mut r = Rig::new(1);
    r.vmapp(2, 0, 15);
    r.cmds(&[ItsCommand::Vmapti {
        device: 0,
        event: 0,
        vpeid: 2,
        vintid: 8195,
        db: DB,
    }]);
    r.schedule(0, 2);
    let state = r.gic.state();
    let json = serde_json::to_string(&state).expect("serialise");
    let back: gic::GicState = serde_json::from_str(&json).expect("parse");
    let mut g = Gic::from_state(&back, r.gic.mem().clone()).expect("restore");
    assert_eq!(g.resident_vpe(0), Some(2));
    g.icv_write(0, IcvReg::Pmr, 0xff).unwrap();
    g.icv_write(0, IcvReg::Igrpen1, 1).unwrap();
    let its = g.config().its[0].base;
    g.mem_mut()
        .write(
            CMDQ + r.slot * 32,
            &ItsCommand::Int {
                device: 0,
                event: 0,
            }
            .to_bytes(),
        )
        .unwrap();
    g.write(its + GITS_CWRITER, 8, (r.slot + 1) * 32).unwrap();
    assert_eq!(g.icv_read(0, IcvReg::Iar1).unwrap(), 8195);
}

#[test]
fn v40_configuration_and_registers() {
    let c = GicConfig::virt_v40(64);
    assert_eq!(c.version(), GicVersion::V4_0);
    assert_eq!(c.validate(), Ok(()));
    assert_eq!(c.rd_base(60), 0x080A_0000 + 60 * 0x4_0000);
    assert_eq!(
        c.rd_base(61),
        gic::config::VIRT_GICR2_BASE,
        "QEMU's second region"
    );
    assert_eq!(GicConfig::virt(1).version(), GicVersion::V3);
    assert_eq!(GicConfig::virt_v41(1, 1).version(), GicVersion::V4_1);
    let mut bad = GicConfig::virt_v40(1);
    bad.v41 = Some(V41Config {
        nassgi_cap: true,
        ..V41Config::v4_0()
    });
    assert!(matches!(bad.validate(), Err(ConfigError::BadV41 { .. })));
    let mut r = Rig::new(1);
    let rd = r.rd(0);
    assert_eq!(r.r64(rd + GICR_TYPER) & GICR_TYPER_VLPIS, GICR_TYPER_VLPIS);
    assert_eq!(
        r.r64(rd + GICR_TYPER) & (GICR_TYPER_RVPEID | GICR_TYPER_DIRTY | GICR_TYPER_VSGI),
        0
    );
    assert_eq!(r.gic.read(0x0800_0000 + GICD_TYPER2, 4).unwrap(), 0);
    // VPENDBASER writes with Valid = 0 keep the VPT address and IDAI; Dirty is read-only.
    let v = rd + GICR_VLPI_OFFSET + GICR_VPENDBASER;
    r.w64(v, VPENDBASER_DIRTY | VPENDBASER_V40_IDAI | 0x4450_0000);
    assert_eq!(r.r64(v), VPENDBASER_V40_IDAI | 0x4450_0000);
}
