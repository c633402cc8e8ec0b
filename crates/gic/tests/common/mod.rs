//! Test driver: boots the model the way a GICv3 driver (Linux, kvm-unit-tests) does and
//! wraps the ITS command queue.
#![allow(dead_code)]

use gic::regs::*;
use gic::{Gic, GicConfig, GuestMem, IccReg, ItsCommand, VecMem};

pub const RAM: u64 = 0x4000_0000;
pub const RAM_SIZE: usize = 4 << 20;
pub const PROP: u64 = RAM + 0x1_0000;
pub const PEND: u64 = RAM + 0x10_0000; // + pe * 64 KiB
pub const DT: u64 = RAM + 0x2_0000;
pub const CT: u64 = RAM + 0x3_0000;
pub const CMDQ: u64 = RAM + 0x4_0000;
pub const ITT: u64 = RAM + 0x20_0000; // device d at + d * 4 KiB
pub const GICD: u64 = 0x0800_0000;
pub const GITS: u64 = 0x0808_0000;
pub const LPI_PRIO: u8 = 0xa0;

pub struct Driver {
    pub gic: Gic<VecMem>,
    pub slot: u64,
}

impl Driver {
    /// A model with `pes` PEs, nothing programmed.
    pub fn bare(pes: usize) -> Driver {
        Driver::bare_with(GicConfig::virt(pes))
    }

    pub fn bare_with(cfg: GicConfig) -> Driver {
        Driver {
            gic: Gic::new(cfg, VecMem::new(RAM, RAM_SIZE)).expect("valid config"),
            slot: 0,
        }
    }

    pub fn rd(&self, pe: usize) -> u64 {
        self.gic.config().rd_base(pe)
    }

    pub fn sgi(&self, pe: usize) -> u64 {
        self.rd(pe) + GICR_SGI_OFFSET
    }

    pub fn w32(&mut self, addr: u64, v: u32) {
        self.gic.write(addr, 4, v as u64).expect("mmio write");
    }

    pub fn w64(&mut self, addr: u64, v: u64) {
        self.gic.write(addr, 8, v).expect("mmio write");
    }

    pub fn r32(&mut self, addr: u64) -> u32 {
        self.gic.read(addr, 4).expect("mmio read") as u32
    }

    pub fn r64(&mut self, addr: u64) -> u64 {
        self.gic.read(addr, 8).expect("mmio read")
    }

    /// Distributor Group 1 on, every CPU interface enabled with PMR 0xff.
    pub fn enable_cpus(&mut self) {
        self.w32(GICD + GICD_CTLR, GICD_CTLR_ENABLE_G1);
        for pe in 0..self.gic.config().num_pes() {
            let rd = self.rd(pe);
            self.w32(rd + GICR_WAKER, 0);
            self.gic.icc_write(pe, IccReg::Pmr, 0xff).unwrap();
            self.gic.icc_write(pe, IccReg::Igrpen1, 1).unwrap();
        }
    }

    /// Writes an LPI configuration byte straight into the property table (no invalidate).
    pub fn set_lpi_config(&mut self, intid: u32, byte: u8) {
        self.gic
            .mem_mut()
            .write(PROP + (intid - LPI_BASE) as u64, &[byte])
            .unwrap();
    }

    /// Property table: every LPI enabled at LPI_PRIO unless `enabled` is false.
    pub fn fill_prop(&mut self, enabled: bool) {
        let b = LPI_PRIO | LPI_PROP_GROUP1 | enabled as u8;
        self.gic
            .mem_mut()
            .write(PROP, &vec![b; (1 << 16) - 8192])
            .unwrap();
    }

    /// LPI tables and EnableLPIs on every redistributor.
    pub fn enable_lpis(&mut self) {
        for pe in 0..self.gic.config().num_pes() {
            let rd = self.rd(pe);
            self.w64(rd + GICR_PROPBASER, PROP | 15);
            self.w64(rd + GICR_PENDBASER, PEND + pe as u64 * 0x1_0000);
            self.w32(rd + GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
        }
    }

    /// Flat device/collection tables, a 4 KiB command queue, ITS enabled.
    pub fn enable_its(&mut self) {
        self.w64(GITS + GITS_BASER, GITS_BASER_VALID | (2 << 8) | DT);
        self.w64(GITS + GITS_BASER + 8, GITS_BASER_VALID | (2 << 8) | CT);
        self.w64(GITS + GITS_CBASER, GITS_CBASER_VALID | CMDQ);
        self.w32(GITS + GITS_CTLR, GITS_CTLR_ENABLED);
        self.slot = 0;
    }

    /// Everything: `pes` PEs, LPIs enabled in the property table, ITS running.
    pub fn booted(pes: usize) -> Driver {
        let mut d = Driver::bare(pes);
        d.fill_prop(true);
        d.enable_cpus();
        d.enable_lpis();
        d.enable_its();
        d
    }

    /// Queues commands (each followed by nothing) and writes CWRITER.
    pub fn cmds(&mut self, cmds: &[ItsCommand]) {
        for c in cmds {
            self.gic
                .mem_mut()
                .write(CMDQ + self.slot * 32, &c.to_bytes())
                .unwrap();
            self.slot = (self.slot + 1) % 128;
        }
        let s = self.slot;
        self.w64(GITS + GITS_CWRITER, s * 32);
    }

    pub fn creadr(&mut self) -> u64 {
        self.r64(GITS + GITS_CREADR)
    }

    /// MAPD device with 8 event bits, MAPC collection c -> PE c for every PE.
    pub fn map_basic(&mut self, devices: u32) {
        let mut v = Vec::new();
        for pe in 0..self.gic.config().num_pes() {
            v.push(ItsCommand::Mapc {
                icid: pe as u16,
                rdbase: pe as u64,
                valid: true,
            });
        }
        for d in 0..devices {
            v.push(ItsCommand::Mapd {
                device: d,
                size: 7,
                itt: ITT + d as u64 * 0x1000,
                valid: true,
            });
        }
        self.cmds(&v);
    }

    pub fn iar(&mut self, pe: usize) -> u32 {
        self.gic.icc_read(pe, IccReg::Iar1).unwrap() as u32
    }

    pub fn eoi(&mut self, pe: usize, intid: u32) {
        self.gic.icc_write(pe, IccReg::Eoir1, intid as u64).unwrap();
    }

    /// Acknowledges and completes everything deliverable on `pe`; returns the INTIDs.
    pub fn drain(&mut self, pe: usize) -> Vec<u32> {
        let mut got = Vec::new();
        for _ in 0..10_000 {
            let i = self.iar(pe);
            if i == INTID_SPURIOUS {
                break;
            }
            got.push(i);
            self.eoi(pe, i);
        }
        got
    }

    /// Whether the pending table of `pe` has `intid`'s bit set.
    pub fn pending_bit(&self, pe: usize, intid: u32) -> bool {
        let mut b = [0u8];
        self.gic
            .mem()
            .read(PEND + pe as u64 * 0x1_0000 + (intid / 8) as u64, &mut b)
            .unwrap();
        b[0] & (1 << (intid % 8)) != 0
    }

    pub fn its_error_count(&self) -> u64 {
        self.gic.its_errors(0).unwrap().1
    }

    pub fn last_its_error(&self) -> Option<gic::ItsCommandError> {
        self.gic.its_errors(0).unwrap().0.last().map(|r| r.error)
    }
}
