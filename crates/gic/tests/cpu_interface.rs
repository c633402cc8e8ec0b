//! CPU interface, SGI/PPI/SPI and distributor/redistributor register scenarios, modelled on
//! kvm-unit-tests `gicv3-ipi`, `gicv3-active` and `gicv3-mmio`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use gic::regs::*;
use gic::{CpuIfError, GicConfig, GuestMem, IccReg, ItsCommand, MmioError};

/// Makes SGIs/PPIs Group 1 and enabled at priority `prio` on every PE.
fn enable_private(d: &mut Driver, prio: u8) {
    for pe in 0..d.gic.config().num_pes() {
        let sgi = d.sgi(pe);
        d.w32(sgi + GICR_IGROUPR0, 0xFFFF_FFFF);
        d.w32(sgi + GICR_ISENABLER0, 0xFFFF_FFFF);
        for i in 0..8 {
            d.w32(sgi + GICR_IPRIORITYR + 4 * i, u32::from_ne_bytes([prio; 4]));
        }
    }
}

fn sgi1r(intid: u64, aff1: u64, rs: u64, list: u64) -> u64 {
    (intid << 24) | (aff1 << 16) | (rs << 44) | list
}

#[test]
fn targeted_sgi_reaches_exactly_the_listed_pes_once() {
    // 20 PEs: PEs 16..19 have Aff1 = 1, so the target list needs Aff1 and RS right.
    let mut d = Driver::bare(20);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    // PE 0 -> PEs 2 and 5 (Aff1 0), SGI 1.
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(1, 0, 0, 0b100100))
        .unwrap();
    // PE 3 -> PE 17 (Aff1 1, Aff0 1), SGI 2.
    d.gic
        .icc_write(3, IccReg::Sgi1r, sgi1r(2, 1, 0, 0b10))
        .unwrap();
    // RS = 1 selects Aff0 16..31: none exist at Aff1 0, so nothing happens.
    d.gic
        .icc_write(3, IccReg::Sgi1r, sgi1r(4, 0, 1, 0xFFFF))
        .unwrap();
    for pe in 0..20 {
        let got = d.drain(pe);
        let want = match pe {
            2 | 5 => vec![1],
            17 => vec![2],
            _ => vec![],
        };
        assert_eq!(got, want, "PE {pe}");
    }
}

#[test]
fn self_ipi_is_delivered_to_the_sender() {
    let mut d = Driver::bare(2);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    d.gic
        .icc_write(1, IccReg::Sgi1r, sgi1r(7, 0, 0, 0b10))
        .unwrap();
    assert_eq!(d.drain(1), vec![7]);
    assert!(d.drain(0).is_empty());
}

#[test]
fn broadcast_sgi_reaches_every_other_pe_once() {
    let mut d = Driver::bare(5);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    d.gic
        .icc_write(2, IccReg::Sgi1r, ICC_SGI1R_IRM | (9 << 24) | 0xFFFF)
        .unwrap();
    for pe in 0..5 {
        let want: Vec<u32> = if pe == 2 { vec![] } else { vec![9] };
        assert_eq!(d.drain(pe), want, "PE {pe}");
    }
}

#[test]
fn sgi_while_active_stays_pending_until_deactivated() {
    let mut d = Driver::bare(2);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(3, 0, 0, 0b10))
        .unwrap();
    assert_eq!(d.iar(1), 3);
    assert!(d.gic.is_active(1, 3));
    assert!(!d.gic.is_pending(1, 3));
    // A second SGI while the first is active: active and pending, not signalled.
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(3, 0, 0, 0b10))
        .unwrap();
    assert!(d.gic.is_pending(1, 3) && d.gic.is_active(1, 3));
    assert!(!d.gic.irq_line(1));
    assert_eq!(d.iar(1), INTID_SPURIOUS);
    d.eoi(1, 3);
    assert!(!d.gic.is_active(1, 3));
    assert_eq!(
        d.drain(1),
        vec![3],
        "the second SGI is delivered exactly once"
    );
}

#[test]
fn clearing_active_state_through_icactiver_from_the_handler() {
    // kvm-unit-tests gicv3-active: the handler clears the active bit with GICR_ICACTIVER0.
    let mut d = Driver::bare(1);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    let sgi = d.sgi(0);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(5, 0, 0, 1))
        .unwrap();
    assert_eq!(d.iar(0), 5);
    assert_eq!(d.r32(sgi + GICR_ISACTIVER0), 1 << 5);
    d.w32(sgi + GICR_ICACTIVER0, 1 << 5);
    assert_eq!(d.r32(sgi + GICR_ISACTIVER0), 0);
    // Running priority still reflects the acknowledged interrupt until EOI.
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0x80);
    d.eoi(0, 5);
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0xFF);
    assert_eq!(d.r32(sgi + GICR_ISACTIVER0), 0);
    // ISACTIVER sets active state: a pending SGI is then not delivered.
    d.w32(sgi + GICR_ISACTIVER0, 1 << 6);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(6, 0, 0, 1))
        .unwrap();
    assert_eq!(d.iar(0), INTID_SPURIOUS);
    d.w32(sgi + GICR_ICACTIVER0, 1 << 6);
    assert_eq!(d.drain(0), vec![6]);
}

#[test]
fn eoimode1_splits_priority_drop_and_deactivation() {
    let mut d = Driver::bare(1);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    d.gic.icc_write(0, IccReg::Ctlr, ICC_CTLR_EOIMODE).unwrap();
    assert_ne!(
        d.gic.icc_read(0, IccReg::Ctlr).unwrap() & ICC_CTLR_EOIMODE,
        0
    );
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(2, 0, 0, 1))
        .unwrap();
    assert_eq!(d.iar(0), 2);
    d.eoi(0, 2);
    assert_eq!(
        d.gic.icc_read(0, IccReg::Rpr).unwrap(),
        0xFF,
        "priority dropped"
    );
    assert!(d.gic.is_active(0, 2), "but still active");
    d.gic.icc_write(0, IccReg::Dir, 2).unwrap();
    assert!(!d.gic.is_active(0, 2));
    // DIR with EOImode = 0 is UNPREDICTABLE; the model ignores it.
    d.gic.icc_write(0, IccReg::Ctlr, 0).unwrap();
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(2, 0, 0, 1))
        .unwrap();
    assert_eq!(d.iar(0), 2);
    d.gic.icc_write(0, IccReg::Dir, 2).unwrap();
    assert!(d.gic.is_active(0, 2));
}

#[test]
fn higher_priority_preempts_and_running_priority_tracks_nesting() {
    let mut d = Driver::bare(1);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    let sgi = d.sgi(0);
    // SGI 1 at 0x80, SGI 2 at 0x40, SGI 3 at 0x88 (same group priority as 0x80 at BPR 3?
    // No: BPR1 = 3 groups bits [7:3], so 0x88 is its own, lower, level).
    d.gic.write(sgi + GICR_IPRIORITYR + 2, 1, 0x40).unwrap();
    d.gic.write(sgi + GICR_IPRIORITYR + 3, 1, 0x88).unwrap();
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(1, 0, 0, 1))
        .unwrap();
    assert_eq!(d.iar(0), 1);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(3, 0, 0, 1))
        .unwrap();
    assert!(!d.gic.irq_line(0), "0x88 cannot preempt 0x80");
    assert_eq!(
        d.gic.icc_read(0, IccReg::Hppir1).unwrap(),
        3,
        "HPPIR1 still reports it"
    );
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(2, 0, 0, 1))
        .unwrap();
    assert!(d.gic.irq_line(0), "0x40 preempts 0x80");
    assert_eq!(d.iar(0), 2);
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0x40);
    assert_eq!(
        d.gic.icc_read(0, IccReg::Ap1r0).unwrap(),
        (1 << 8) | (1 << 16)
    );
    d.eoi(0, 2);
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0x80);
    d.eoi(0, 1);
    assert_eq!(d.drain(0), vec![3]);
    // With BPR1 = 7 the group priority is bit 7 only: 0x40 no longer preempts 0x70.
    d.gic.write(sgi + GICR_IPRIORITYR + 1, 1, 0x70).unwrap();
    d.gic.icc_write(0, IccReg::Bpr1, 7).unwrap();
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(1, 0, 0, 1))
        .unwrap();
    assert_eq!(d.iar(0), 1);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(2, 0, 0, 1))
        .unwrap();
    assert!(!d.gic.irq_line(0));
    d.eoi(0, 1);
    assert_eq!(d.drain(0), vec![2]);
    // BPR1 below its minimum reads back the minimum.
    d.gic.icc_write(0, IccReg::Bpr1, 0).unwrap();
    assert_eq!(d.gic.icc_read(0, IccReg::Bpr1).unwrap(), BPR1_MIN as u64);
}

#[test]
fn priority_mask_and_group_enables_gate_signalling() {
    let mut d = Driver::bare(1);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    d.gic.icc_write(0, IccReg::Pmr, 0x80).unwrap();
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(1, 0, 0, 1))
        .unwrap();
    assert!(!d.gic.irq_line(0), "priority 0x80 is not below PMR 0x80");
    d.gic.icc_write(0, IccReg::Pmr, 0x88).unwrap();
    assert!(d.gic.irq_line(0));
    d.gic.icc_write(0, IccReg::Igrpen1, 0).unwrap();
    assert!(!d.gic.irq_line(0));
    assert_eq!(d.gic.icc_read(0, IccReg::Hppir1).unwrap(), 1023);
    d.gic.icc_write(0, IccReg::Igrpen1, 1).unwrap();
    d.w32(GICD + GICD_CTLR, 0);
    assert!(!d.gic.irq_line(0), "distributor Group 1 disabled");
    d.w32(GICD + GICD_CTLR, GICD_CTLR_ENABLE_G1);
    // Group 0 interrupts are never signalled on the Group 1 IRQ interface.
    let sgi = d.sgi(0);
    d.w32(sgi + GICR_IGROUPR0, 0);
    assert!(!d.gic.irq_line(0));
    d.w32(sgi + GICR_IGROUPR0, 0xFFFF_FFFF);
    assert_eq!(d.drain(0), vec![1]);
    // PMR keeps only the implemented priority bits.
    d.gic.icc_write(0, IccReg::Pmr, 0xFF).unwrap();
    assert_eq!(d.gic.icc_read(0, IccReg::Pmr).unwrap(), 0xF8);
}

#[test]
fn spis_follow_irouter_affinity() {
    let mut d = Driver::bare(3);
    d.enable_cpus();
    let n = 40u32;
    d.w32(GICD + GICD_IGROUPR + 4, 1 << (n - 32));
    d.w32(GICD + GICD_ISENABLER + 4, 1 << (n - 32));
    d.w64(GICD + GICD_IROUTER + 8 * n as u64, 2); // Aff0 = 2 -> PE 2
    assert!(d.gic.set_spi_pending(n));
    assert!(d.drain(0).is_empty() && d.drain(1).is_empty());
    assert_eq!(d.drain(2), vec![n]);
    assert!(!d.gic.is_active(2, n));
    // Routed to an affinity with no PE: stays pending, reaches nobody.
    d.w64(GICD + GICD_IROUTER + 8 * n as u64, 0x77);
    d.w32(GICD + GICD_ISPENDR + 4, 1 << (n - 32));
    for pe in 0..3 {
        assert!(d.drain(pe).is_empty());
    }
    assert!(d.gic.is_pending(0, n));
    // Re-routing delivers it.
    d.w64(GICD + GICD_IROUTER + 8 * n as u64, 1);
    assert_eq!(d.drain(1), vec![n]);
    // Not an SPI: refused.
    assert!(!d.gic.set_spi_pending(20));
    assert!(!d.gic.set_spi_pending(1020));
}

#[test]
fn ppi_pending_latch_is_delivered_to_its_pe() {
    let mut d = Driver::bare(2);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    assert!(d.gic.set_ppi_pending(1, 27));
    assert!(!d.gic.set_ppi_pending(1, 5), "SGI range is not a PPI");
    assert!(!d.gic.set_ppi_pending(9, 27), "no PE 9");
    assert!(d.drain(0).is_empty());
    assert_eq!(d.drain(1), vec![27]);
}

#[test]
fn irq_line_can_be_waited_on_from_another_thread_and_hooked() {
    let mut d = Driver::bare(2);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    let changes = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&changes);
    d.gic.set_irq_hook(Some(Box::new(move |_, _| {
        c2.fetch_add(1, Ordering::SeqCst);
    })));
    let lines = d.gic.irq_lines();
    let waiter = std::thread::spawn(move || lines.wait_for(1, true, Duration::from_secs(10)));
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(4, 0, 0, 0b10))
        .unwrap();
    assert!(waiter.join().unwrap(), "waiter saw the line rise");
    assert_eq!(d.drain(1), vec![4]);
    assert!(!d.gic.irq_lines().level(1));
    assert_eq!(changes.load(Ordering::SeqCst), 2, "one rise, one fall");
    assert!(!d
        .gic
        .irq_lines()
        .wait_for(0, true, Duration::from_millis(10)));
}

#[test]
fn cpu_interface_rejects_bad_pe_and_wrong_direction() {
    let mut d = Driver::bare(1);
    assert_eq!(d.gic.icc_read(1, IccReg::Pmr), Err(CpuIfError::NoSuchPe(1)));
    assert!(matches!(
        d.gic.icc_read(0, IccReg::Eoir1),
        Err(CpuIfError::Direction { .. })
    ));
    assert!(matches!(
        d.gic.icc_write(0, IccReg::Iar1, 0),
        Err(CpuIfError::Direction { .. })
    ));
    // EOI with nothing active, and of a special INTID, change nothing.
    d.eoi(0, 5);
    d.eoi(0, 1023);
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0xFF);
    let ctlr = d.gic.icc_read(0, IccReg::Ctlr).unwrap();
    assert_eq!((ctlr >> ICC_CTLR_PRIBITS_SHIFT) & 7, 4, "5 priority bits");
}

#[test]
fn mmio_rejects_bad_accesses_without_side_effects() {
    let mut d = Driver::bare(1);
    assert_eq!(d.gic.read(GICD, 3), Err(MmioError::BadWidth { width: 3 }));
    assert_eq!(
        d.gic.read(GICD + 2, 4),
        Err(MmioError::Unaligned {
            addr: GICD + 2,
            width: 4
        })
    );
    assert_eq!(
        d.gic.read(0x1000, 4),
        Err(MmioError::Unmapped { addr: 0x1000 })
    );
    assert_eq!(
        d.gic.write(GICD + GICD_CTLR, 1, 0xFF),
        Err(MmioError::WidthNotPermitted {
            offset: 0,
            width: 1
        })
    );
    assert_eq!(d.r32(GICD + GICD_CTLR), GICD_CTLR_ARE | GICD_CTLR_DS);
    assert!(d.gic.write(GICD + GICD_CTLR, 8, u64::MAX).is_err());
    // 64-bit registers accept 32-bit halves.
    let rd = d.rd(0);
    d.gic.write(rd + GICR_PROPBASER + 4, 4, 0x1).unwrap();
    assert_eq!(d.r64(rd + GICR_PROPBASER), 1 << 32);
    // The distributor's INTID 0..31 registers are RAZ/WI with affinity routing.
    d.w32(GICD + GICD_ISENABLER, 0xFFFF_FFFF);
    assert_eq!(d.r32(GICD + GICD_ISENABLER), 0);
    // Registers beyond the implemented SPIs are RAZ/WI.
    d.w32(GICD + GICD_ISENABLER + 0x7C, 0xFFFF_FFFF);
    assert_eq!(d.r32(GICD + GICD_ISENABLER + 0x7C), 0);
    // SGI configuration is fixed edge.
    let sgi = d.sgi(0);
    d.w32(sgi + GICR_ICFGR0, 0);
    assert_eq!(d.r32(sgi + GICR_ICFGR0), GICR_ICFGR0_VALUE);
}

#[test]
fn gicr_typer_numbers_pes_and_marks_the_last() {
    let mut cfg = GicConfig::virt(3);
    cfg.pe_affinities = vec![0x0100_0000, 0x0000_0102, 0x0000_0001];
    let mut d = Driver::bare_with(cfg);
    for pe in 0..3 {
        let t = d.r64(d.rd(pe) + GICR_TYPER);
        assert_eq!((t >> 8) & 0xFFFF, pe as u64, "Processor_Number");
        assert_eq!(t & GICR_TYPER_LAST != 0, pe == 2);
        assert_ne!(t & GICR_TYPER_PLPIS, 0);
    }
    assert_eq!(d.r64(d.rd(0) + GICR_TYPER) >> 32, 0x0100_0000);
    // An SGI with Aff3 = 1 reaches PE 0 only.
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    d.gic
        .icc_write(2, IccReg::Sgi1r, (1u64 << 48) | (8 << 24) | 1)
        .unwrap();
    assert_eq!(d.drain(0), vec![8]);
    assert!(d.drain(1).is_empty() && d.drain(2).is_empty());
}

#[test]
fn direct_lpi_registers_set_and_clear_pending_state() {
    let mut d = Driver::booted(1);
    let rd = d.rd(0);
    d.w64(rd + GICR_SETLPIR, 8300);
    assert!(d.pending_bit(0, 8300));
    d.w64(rd + GICR_CLRLPIR, 8300);
    assert!(!d.pending_bit(0, 8300));
    assert!(d.drain(0).is_empty());
    d.w64(rd + GICR_SETLPIR, 8301);
    assert_eq!(d.drain(0), vec![8301]);
    // Out of range (PROPBASER.IDbits = 15 -> 16 bits): ignored.
    d.w64(rd + GICR_SETLPIR, 70000);
    assert!(d.gic.pending_lpis(0).is_empty());
}

#[test]
fn lpi_tables_are_fixed_while_enabled_and_pending_state_reloads_on_enable() {
    let mut d = Driver::booted(1);
    let rd = d.rd(0);
    let prop = d.r64(rd + GICR_PROPBASER);
    d.w64(rd + GICR_PROPBASER, 0);
    assert_eq!(
        d.r64(rd + GICR_PROPBASER),
        prop,
        "PROPBASER is WI while EnableLPIs = 1"
    );
    assert_eq!(d.r32(rd + GICR_CTLR), GICR_CTLR_ENABLE_LPIS | GICR_CTLR_CES);
    // Mask, make an LPI pending, disable LPIs: the state stays in memory.
    d.gic.icc_write(0, IccReg::Pmr, 0).unwrap();
    d.w64(rd + GICR_SETLPIR, 8200);
    d.w32(rd + GICR_CTLR, 0);
    assert_eq!(d.r32(rd + GICR_CTLR), GICR_CTLR_CES);
    assert!(d.pending_bit(0, 8200));
    assert!(d.gic.pending_lpis(0).is_empty());
    // Software also sets a bit in the table by hand while LPIs are off.
    d.gic
        .mem_mut()
        .write(PEND + 8400 / 8, &[1 << (8400 % 8)])
        .unwrap();
    d.w32(rd + GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    assert_eq!(d.gic.pending_lpis(0), vec![8200, 8400]);
    d.gic.icc_write(0, IccReg::Pmr, 0xFF).unwrap();
    assert_eq!(d.drain(0), vec![8200, 8400]);
    // PTZ: the table is declared zero, so stale bits are not loaded.
    d.w32(rd + GICR_CTLR, 0);
    d.gic
        .mem_mut()
        .write(PEND + 8400 / 8, &[1 << (8400 % 8)])
        .unwrap();
    d.w64(rd + GICR_PENDBASER, PEND | GICR_PENDBASER_PTZ);
    assert_eq!(
        d.r64(rd + GICR_PENDBASER),
        PEND,
        "PTZ is write-only, reads as 0"
    );
    d.w32(rd + GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    assert!(
        d.gic.pending_lpis(0).is_empty(),
        "PTZ: the stale bit is not loaded"
    );
    // PTZ was consumed: the next enable reads the table again.
    d.w32(rd + GICR_CTLR, 0);
    d.w32(rd + GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    assert_eq!(d.gic.pending_lpis(0), vec![8400]);
}

#[test]
fn lpis_to_a_redistributor_with_lpis_disabled_are_dropped() {
    let mut d = Driver::booted(2);
    d.map_basic(1);
    let rd1 = d.rd(1);
    d.w32(rd1 + GICR_CTLR, 0);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8192,
            icid: 1,
        },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
    ]);
    assert!(!d.pending_bit(1, 8192));
    d.w32(rd1 + GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    assert!(d.drain(1).is_empty());
}

#[test]
fn level_sensitive_spi_is_pending_while_its_line_is_high() {
    let mut d = Driver::bare(1);
    d.enable_cpus();
    let n = 33u32;
    d.w32(GICD + GICD_IGROUPR + 4, 1 << 1);
    d.w32(GICD + GICD_ISENABLER + 4, 1 << 1);
    // GICD_ICFGR reset value: level-sensitive.
    assert!(d.gic.set_spi_level(n, true));
    assert_eq!(
        d.r32(GICD + GICD_ISPENDR + 4),
        1 << 1,
        "ISPENDR shows the line"
    );
    // ICPENDR cannot clear a level that is still asserted.
    d.w32(GICD + GICD_ICPENDR + 4, 1 << 1);
    assert!(d.gic.is_pending(0, n));
    assert_eq!(d.iar(0), n);
    assert!(
        d.gic.is_active(0, n) && d.gic.is_pending(0, n),
        "active and pending"
    );
    d.eoi(0, n);
    assert_eq!(d.iar(0), n, "still asserted: delivered again");
    d.gic.set_spi_level(n, false);
    d.eoi(0, n);
    assert!(!d.gic.is_pending(0, n));
    assert_eq!(d.iar(0), INTID_SPURIOUS);
    assert!(!d.gic.set_spi_level(1020, true));
}

#[test]
fn edge_triggered_spi_latches_one_event_per_rising_edge() {
    let mut d = Driver::bare(1);
    d.enable_cpus();
    let n = 34u32;
    d.w32(GICD + GICD_IGROUPR + 4, 1 << 2);
    d.w32(GICD + GICD_ISENABLER + 4, 1 << 2);
    d.w32(GICD + GICD_ICFGR + 8, 0b10 << 4); // INTID 34 edge-triggered
    d.gic.set_spi_level(n, true);
    d.gic.set_spi_level(n, true); // no new edge
    assert_eq!(d.drain(0), vec![n]);
    d.gic.set_spi_level(n, false);
    d.gic.set_spi_level(n, true);
    d.gic.set_spi_level(n, false);
    assert!(d.gic.is_pending(0, n), "the latch outlives the pulse");
    assert_eq!(d.drain(0), vec![n]);
}

#[test]
fn level_sensitive_ppi_follows_its_line_and_survives_migration() {
    let mut d = Driver::bare(2);
    d.enable_cpus();
    for pe in 0..2 {
        let sgi = d.sgi(pe);
        d.w32(sgi + GICR_IGROUPR0, 1 << 27);
        d.w32(sgi + GICR_ISENABLER0, 1 << 27);
    }
    assert!(d.gic.set_ppi_level(1, 27, true));
    assert!(!d.gic.set_ppi_level(1, 3, true), "SGIs have no line");
    assert!(d.drain(0).is_empty());
    assert_eq!(d.iar(1), 27);
    let st = d.gic.state();
    let mut m = Driver {
        gic: gic::Gic::from_state(&st, d.gic.mem().clone()).unwrap(),
        slot: 0,
    };
    m.eoi(1, 27);
    assert_eq!(m.iar(1), 27, "line still high after migration");
    m.gic.set_ppi_level(1, 27, false);
    m.eoi(1, 27);
    assert_eq!(m.iar(1), INTID_SPURIOUS);
}

/// SGI `intid` Group 0 (IGROUPR bit clear) at `prio`, everything else as `enable_private`.
fn make_group0(d: &mut Driver, pe: usize, intid: u32, prio: u8) {
    let sgi = d.sgi(pe);
    let g = d.r32(sgi + GICR_IGROUPR0);
    d.w32(sgi + GICR_IGROUPR0, g & !(1 << intid));
    d.gic
        .write(sgi + GICR_IPRIORITYR + intid as u64, 1, prio as u64)
        .unwrap();
}

fn enable_group0(d: &mut Driver) {
    d.w32(GICD + GICD_CTLR, GICD_CTLR_ENABLE_G0 | GICD_CTLR_ENABLE_G1);
    for pe in 0..d.gic.config().num_pes() {
        d.gic.icc_write(pe, IccReg::Igrpen0, 1).unwrap();
    }
}

#[test]
fn group0_interrupts_are_signalled_on_fiq_and_acknowledged_through_iar0() {
    let mut d = Driver::bare(1);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    make_group0(&mut d, 0, 6, 0x40);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(6, 0, 0, 1))
        .unwrap();
    assert!(!d.gic.fiq_line(0), "Group 0 disabled: nothing");
    assert!(!d.gic.irq_line(0));
    enable_group0(&mut d);
    assert!(d.gic.fiq_line(0) && !d.gic.irq_line(0));
    assert!(d.gic.irq_lines().fiq_level(0));
    assert_eq!(d.gic.icc_read(0, IccReg::Hppir0).unwrap(), 6);
    assert_eq!(d.gic.icc_read(0, IccReg::Hppir1).unwrap(), 1023);
    assert_eq!(
        d.iar(0),
        INTID_SPURIOUS,
        "IAR1 does not acknowledge Group 0"
    );
    assert_eq!(d.gic.icc_read(0, IccReg::Iar0).unwrap(), 6);
    assert_eq!(d.gic.icc_read(0, IccReg::Ap0r0).unwrap(), 1 << 8);
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0x40);
    d.gic.icc_write(0, IccReg::Eoir0, 6).unwrap();
    assert!(!d.gic.is_active(0, 6));
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0xFF);
    assert!(!d.gic.fiq_line(0));
}

#[test]
fn higher_priority_group0_blocks_iar1_until_taken() {
    let mut d = Driver::bare(1);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    enable_group0(&mut d);
    make_group0(&mut d, 0, 6, 0x40);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(6, 0, 0, 1))
        .unwrap();
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(1, 0, 0, 1))
        .unwrap();
    assert!(d.gic.fiq_line(0) && !d.gic.irq_line(0));
    assert_eq!(d.iar(0), INTID_SPURIOUS);
    // With Group 0 disabled at the CPU interface the Group 1 SGI is next in line.
    d.gic.icc_write(0, IccReg::Igrpen0, 0).unwrap();
    assert!(d.gic.irq_line(0) && !d.gic.fiq_line(0));
    d.gic.icc_write(0, IccReg::Igrpen0, 1).unwrap();
    // Take the FIQ first, then the IRQ cannot preempt it (0x80 vs running 0x40).
    assert_eq!(d.gic.icc_read(0, IccReg::Iar0).unwrap(), 6);
    assert!(!d.gic.irq_line(0));
    // EOIR1 while Group 0 holds the highest active priority is ignored.
    d.gic.icc_write(0, IccReg::Eoir1, 6).unwrap();
    assert!(d.gic.is_active(0, 6));
    d.gic.icc_write(0, IccReg::Eoir0, 6).unwrap();
    assert_eq!(d.drain(0), vec![1]);
}

#[test]
fn group0_preempts_an_active_group1_interrupt() {
    let mut d = Driver::bare(1);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    enable_group0(&mut d);
    make_group0(&mut d, 0, 6, 0x40);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(1, 0, 0, 1))
        .unwrap();
    assert_eq!(d.iar(0), 1);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(6, 0, 0, 1))
        .unwrap();
    assert!(d.gic.fiq_line(0), "0x40 preempts the running 0x80");
    assert_eq!(d.gic.icc_read(0, IccReg::Iar0).unwrap(), 6);
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0x40);
    d.gic.icc_write(0, IccReg::Eoir0, 6).unwrap();
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0x80);
    d.eoi(0, 1);
    assert_eq!(d.gic.icc_read(0, IccReg::Rpr).unwrap(), 0xFF);
    // BPR0 reads back its minimum after a too-small write.
    d.gic.icc_write(0, IccReg::Bpr0, 0).unwrap();
    assert_eq!(d.gic.icc_read(0, IccReg::Bpr0).unwrap(), BPR0_MIN as u64);
}

#[test]
fn sgi0r_reaches_only_targets_where_the_sgi_is_group0() {
    let mut d = Driver::bare(2);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    enable_group0(&mut d);
    make_group0(&mut d, 1, 6, 0x40);
    // SGI 6 is Group 0 on PE 1 only; SGI0R broadcast reaches PE 1, not PE 0.
    d.gic
        .icc_write(1, IccReg::Sgi0r, ICC_SGI1R_IRM | (6 << 24))
        .unwrap();
    d.gic
        .icc_write(0, IccReg::Sgi0r, sgi1r(6, 0, 0, 0b11))
        .unwrap();
    assert!(
        !d.gic.is_pending(0, 6),
        "Group 1 on PE 0: SGI0R does not reach it"
    );
    assert!(d.gic.fiq_line(1));
    assert_eq!(d.gic.icc_read(1, IccReg::Iar0).unwrap(), 6);
    d.gic.icc_write(1, IccReg::Eoir0, 6).unwrap();
    assert_eq!(
        d.gic.icc_read(1, IccReg::Iar0).unwrap(),
        INTID_SPURIOUS as u64,
        "once"
    );
    // SGI1R reaches both, whatever the group.
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(6, 0, 0, 0b11))
        .unwrap();
    assert_eq!(d.drain(0), vec![6]);
    assert_eq!(d.gic.icc_read(1, IccReg::Iar0).unwrap(), 6);
}

#[test]
fn second_redistributor_region_serves_pes_beyond_the_first() {
    // Like QEMU's virt with more than 123 PEs: PEs 123.. live in the high region.
    let mut cfg = GicConfig::virt(130);
    cfg.its[0].pta = true;
    let mut d = Driver::bare_with(cfg);
    let rd125 = d.rd(125);
    assert_eq!(rd125, gic::config::VIRT_GICR2_BASE + 2 * 0x2_0000);
    let typer = d.r64(rd125 + GICR_TYPER);
    assert_eq!((typer >> 8) & 0xFFFF, 125);
    assert_eq!(typer >> 32, (7 << 8) | 13, "Aff1 7, Aff0 13");
    assert_eq!(
        d.r64(d.rd(122) + GICR_TYPER) & GICR_TYPER_LAST,
        GICR_TYPER_LAST
    );
    assert_eq!(d.r64(d.rd(123) + GICR_TYPER) & GICR_TYPER_LAST, 0);
    assert_eq!(
        d.r64(d.rd(129) + GICR_TYPER) & GICR_TYPER_LAST,
        GICR_TYPER_LAST
    );
    // The hole after the first region is not a redistributor.
    assert!(d.gic.read(d.rd(122) + 0x2_0000, 4).is_err());
    d.fill_prop(true);
    d.enable_cpus();
    enable_private(&mut d, 0x80);
    d.gic
        .icc_write(0, IccReg::Sgi1r, sgi1r(2, 7, 0, 1 << 13))
        .unwrap();
    assert_eq!(d.drain(125), vec![2]);
    // An ITS with PTA targets the high region by address (only PE 125 gets LPI tables).
    d.w64(rd125 + GICR_PROPBASER, PROP | 15);
    d.w64(rd125 + GICR_PENDBASER, PEND);
    d.w32(rd125 + GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    d.enable_its();
    d.cmds(&[
        ItsCommand::Mapc {
            icid: 0,
            rdbase: rd125 >> 16,
            valid: true,
        },
        ItsCommand::Mapd {
            device: 0,
            size: 2,
            itt: ITT,
            valid: true,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 1,
            intid: 8200,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 1,
        },
    ]);
    assert_eq!(d.its_error_count(), 0);
    assert_eq!(d.drain(125), vec![8200]);
}
