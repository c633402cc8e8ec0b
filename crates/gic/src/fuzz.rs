//! The byte-string entry point shared by the cargo-fuzz target (`fuzz/`) and the proptest
//! smoke test that runs in CI: it boots a small model (2 PEs, one ITS, tables in RAM), then
//! interprets the bytes as a sequence of MMIO accesses, raw ITS commands, CPU-interface
//! accesses, MSIs and save/restore round trips. It must never panic on any input; it does panic (deliberately, so the fuzzer reports it) when an
//! invariant breaks: it checks that
//! save/restore is lossless and that acknowledged interrupts were pending.

use crate::config::GicConfig;
use crate::cpuif::IccReg;
use crate::error::ConfigError;
use crate::mem::{GuestMem, VecMem};
use crate::regs::*;
use crate::Gic;

/// RAM base of the fuzz model.
pub const RAM_BASE: u64 = 0x4000_0000;
/// RAM size of the fuzz model.
pub const RAM_SIZE: usize = 1 << 20;
/// LPI property table.
pub const PROP_TABLE: u64 = RAM_BASE + 0x1_0000;
/// Pending tables: PE n's at `PEND_TABLE + n * 64 KiB`.
pub const PEND_TABLE: u64 = RAM_BASE + 0x2_0000;
/// Device table (one 64 KiB page, flat).
pub const DEVICE_TABLE: u64 = RAM_BASE + 0x4_0000;
/// Collection table (one 64 KiB page, flat).
pub const COLLECTION_TABLE: u64 = RAM_BASE + 0x5_0000;
/// Command queue (one 4 KiB page: 128 commands).
pub const CMD_QUEUE: u64 = RAM_BASE + 0x6_0000;
/// ITTs: device n's at `ITT_BASE + n * 4 KiB`.
pub const ITT_BASE: u64 = RAM_BASE + 0x7_0000;

/// Builds the fuzz model and programs it the way a driver would: distributor and CPU
/// interfaces enabled, LPI tables set (16 LPI ID bits, all LPIs enabled at priority 0xa0),
/// LPIs enabled, device and collection tables, command queue, ITS enabled.
pub fn booted_model() -> Result<Gic<VecMem>, ConfigError> {
    let mut gic = Gic::new(GicConfig::virt(2), VecMem::new(RAM_BASE, RAM_SIZE))?;
    let _ = gic
        .mem_mut()
        .write(PROP_TABLE, &vec![0xa1u8; 0x1_0000 - 0x400]);
    let _ = gic.write(0x0800_0000, 4, GICD_CTLR_ENABLE_G1 as u64);
    for pe in 0..2 {
        let rd = gic.config().rd_base(pe);
        let _ = gic.write(rd + GICR_WAKER, 4, 0);
        let _ = gic.write(rd + GICR_PROPBASER, 8, PROP_TABLE | 15);
        let _ = gic.write(rd + GICR_PENDBASER, 8, PEND_TABLE + pe as u64 * 0x1_0000);
        let _ = gic.write(rd + GICR_CTLR, 4, GICR_CTLR_ENABLE_LPIS as u64);
        let _ = gic.write(rd + GICR_SGI_OFFSET + GICR_IGROUPR0, 4, 0xFFFF_FFFF);
        let _ = gic.write(rd + GICR_SGI_OFFSET + GICR_ISENABLER0, 4, 0xFFFF_FFFF);
        let _ = gic.icc_write(pe, IccReg::Pmr, 0xFF);
        let _ = gic.icc_write(pe, IccReg::Igrpen1, 1);
    }
    let its = 0x0808_0000;
    let _ = gic.write(
        its + GITS_BASER,
        8,
        GITS_BASER_VALID | (2 << 8) | DEVICE_TABLE,
    );
    let _ = gic.write(
        its + GITS_BASER + 8,
        8,
        GITS_BASER_VALID | (2 << 8) | COLLECTION_TABLE,
    );
    let _ = gic.write(its + GITS_CBASER, 8, GITS_CBASER_VALID | CMD_QUEUE);
    let _ = gic.write(its + GITS_CTLR, 4, GITS_CTLR_ENABLED as u64);
    Ok(gic)
}

/// Reads bytes from the input, yielding zeros once it is exhausted.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// Interprets `data` as operations on a freshly booted model. Never panics on any input;
/// returns the number of operations run.
pub fn run(data: &[u8]) -> usize {
    match booted_model() {
        Ok(mut gic) => run_on(&mut gic, data),
        Err(_) => 0,
    }
}

/// Interprets `data` as operations on `gic` (see [`run`]).
pub fn run_on(gic: &mut Gic<VecMem>, data: &[u8]) -> usize {
    let mut inp = Input { data, pos: 0 };
    let mut ops = 0;
    let mut cmd_slot = 0u64;
    while !inp.done() && ops < 4096 {
        ops += 1;
        let npe = gic.config().num_pes();
        match inp.u8() % 9 {
            0 | 1 => {
                let frame = match inp.u8() % 4 {
                    0 => 0x0800_0000,
                    1 => 0x080A_0000 + (inp.u8() as u64 % 3) * 0x2_0000,
                    2 => 0x080B_0000 + (inp.u8() as u64 % 3) * 0x2_0000,
                    _ => 0x0808_0000 + (inp.u8() as u64 & 1) * 0x1_0000,
                };
                let off = (inp.u32() as u64) & 0x1_FFFF;
                let width = [1u8, 2, 4, 8, 3, 0][inp.u8() as usize % 6];
                let addr = frame + off;
                if ops % 2 == 0 {
                    let _ = gic.read(addr, width);
                } else {
                    let v = inp.u64();
                    let _ = gic.write(addr, width, v);
                }
            }
            2 | 3 => {
                // A raw command, mostly with small IDs so it hits mapped state.
                let mut dw = [inp.u64(), inp.u64(), inp.u64(), inp.u64()];
                if inp.u8() & 1 == 0 {
                    dw[0] = (dw[0] & 0xF) | (((dw[0] >> 32) & 3) << 32);
                    dw[1] &= 0x0000_FFFF_0000_000F;
                    dw[1] |= (0x2000 + (dw[1] >> 32 & 0xF)) << 32;
                    dw[2] = (dw[2] & 0x8000_0000_0001_0003) | ((dw[2] >> 16 & 3) << 16);
                    if dw[0] as u8 == CMD_MAPD {
                        dw[1] = dw[1] & !0x1F | 3;
                        dw[2] = (dw[2] & (1 << 63)) | (ITT_BASE + ((dw[0] >> 32) & 3) * 0x1000);
                    }
                }
                let mut bytes = [0u8; 32];
                for (i, d) in dw.iter().enumerate() {
                    bytes[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
                }
                let _ = gic.mem_mut().write(CMD_QUEUE + cmd_slot * 32, &bytes);
                cmd_slot = (cmd_slot + 1) % 128;
                let _ = gic.write(0x0808_0000 + GITS_CWRITER, 8, cmd_slot * 32);
            }
            4 => {
                let pe = inp.u8() as usize % npe;
                let (hppir, iar) = if inp.u8() & 1 == 0 {
                    (IccReg::Hppir1, IccReg::Iar1)
                } else {
                    (IccReg::Hppir0, IccReg::Iar0)
                };
                let before_hppi = gic.icc_read(pe, hppir).unwrap_or(1023) as u32;
                let intid = gic.icc_read(pe, iar).unwrap_or(1023) as u32;
                // An acknowledged interrupt must be the one HPPIR1 reported.
                assert!(
                    intid == 1023 || intid == before_hppi,
                    "IAR1 {intid} != HPPIR1 {before_hppi}"
                );
                if inp.u8() & 1 == 0 && intid != 1023 {
                    let eoir = if iar == IccReg::Iar0 {
                        IccReg::Eoir0
                    } else {
                        IccReg::Eoir1
                    };
                    let _ = gic.icc_write(pe, eoir, intid as u64);
                }
            }
            5 => {
                let pe = inp.u8() as usize % npe;
                let reg = [
                    IccReg::Eoir1,
                    IccReg::Dir,
                    IccReg::Pmr,
                    IccReg::Bpr1,
                    IccReg::Ctlr,
                    IccReg::Igrpen1,
                    IccReg::Sgi1r,
                    IccReg::Ap1r0,
                    IccReg::Eoir0,
                    IccReg::Bpr0,
                    IccReg::Igrpen0,
                    IccReg::Ap0r0,
                    IccReg::Sgi0r,
                ][inp.u8() as usize % 13];
                let v = inp.u64();
                let _ = gic.icc_write(pe, reg, v);
            }
            6 => {
                let dev = inp.u8() as u32 % 5;
                let ev = inp.u8() as u32 % 20;
                let _ = gic.send_msi(0, dev, ev);
            }
            7 => {
                let _ = gic.write_log().pending_pages();
                let mut pages = Vec::new();
                gic.write_log().drain_pages_into(&mut pages);
            }
            _ => {
                let st = gic.state();
                let mem = gic.mem().clone();
                match Gic::from_state(&st, mem) {
                    Ok(g) => {
                        assert_eq!(g.state(), st, "save/restore must be lossless");
                        *gic = g;
                    }
                    Err(e) => panic!("restoring a state the model produced failed: {e}"),
                }
            }
        }
    }
    ops
}
