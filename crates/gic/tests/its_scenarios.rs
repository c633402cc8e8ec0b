//! ITS scenarios modelled on kvm-unit-tests `its-introspection`, `its-trigger` and the
//! migration tests, plus command error handling and table formats.

mod common;

use common::*;
use gic::regs::*;
use gic::{GicConfig, GuestMem, ItsCommand, ItsCommandError, ItsConfig};

#[test]
fn its_introspection_reports_typer_and_baser_types_and_entry_sizes() {
    let mut d = Driver::bare(2);
    let typer = d.r64(GITS + GITS_TYPER);
    assert_eq!(typer & GITS_TYPER_PHYSICAL, 1, "physical LPIs");
    assert_eq!((typer >> 4) & 0xF, 15, "ITT entry size 16 bytes");
    assert_eq!((typer >> 8) & 0x1F, 15, "16 EventID bits");
    assert_eq!((typer >> 13) & 0x1F, 15, "16 DeviceID bits");
    assert_eq!(typer & GITS_TYPER_PTA, 0, "processor-number targeting");
    assert_eq!((typer >> 24) & 0xFF, 0, "no hardware collections");
    // 32-bit halves read the same value.
    assert_eq!(d.r32(GITS + GITS_TYPER) as u64, typer & 0xFFFF_FFFF);
    assert_eq!(d.r32(GITS + GITS_TYPER + 4) as u64, typer >> 32);
    let b0 = d.r64(GITS + GITS_BASER);
    let b1 = d.r64(GITS + GITS_BASER + 8);
    assert_eq!((b0 >> 56) & 7, GITS_BASER_TYPE_DEVICE);
    assert_eq!((b0 >> 48) & 0x1F, 7, "8-byte DTE");
    assert_eq!((b1 >> 56) & 7, GITS_BASER_TYPE_COLLECTION);
    assert_eq!((b1 >> 48) & 0x1F, 7, "8-byte CTE");
    for n in 2..8 {
        let b = d.r64(GITS + GITS_BASER + 8 * n);
        assert_eq!(b, 0, "BASER{n} is unimplemented (type none)");
        d.w64(GITS + GITS_BASER + 8 * n, u64::MAX);
        assert_eq!(d.r64(GITS + GITS_BASER + 8 * n), 0, "BASER{n} is RAZ/WI");
    }
    // Type and Entry_Size are read-only; page size is probed by write/read-back.
    d.w64(GITS + GITS_BASER, u64::MAX);
    let b0 = d.r64(GITS + GITS_BASER);
    assert_eq!((b0 >> 56) & 7, GITS_BASER_TYPE_DEVICE);
    assert_eq!((b0 >> 48) & 0x1F, 7);
    assert_eq!(
        (b0 >> 8) & 3,
        2,
        "reserved page size 0b11 reads back as 64 KiB"
    );
    assert_ne!(b0 & GITS_BASER_INDIRECT, 0, "indirect tables supported");
    assert_eq!(
        d.r32(GITS + GITS_CTLR),
        GITS_CTLR_QUIESCENT,
        "reset: disabled, quiescent"
    );
    assert_eq!(d.r32(GITS + PIDR2) >> 4 & 0xF, 3, "ArchRev GICv3");
}

#[test]
fn int_delivers_lpi_to_the_pe_its_collection_targets() {
    let mut d = Driver::booted(4);
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 5,
            intid: 8200,
            icid: 2,
        },
        ItsCommand::Invall { icid: 2 },
        ItsCommand::Int {
            device: 0,
            event: 5,
        },
    ]);
    assert_eq!(d.its_error_count(), 0);
    assert_eq!(d.creadr(), d.slot * 32, "queue fully consumed");
    assert!(
        d.pending_bit(2, 8200),
        "pending bit written to PE 2's pending table"
    );
    for pe in [0, 1, 3] {
        assert!(!d.gic.irq_line(pe));
        assert!(d.drain(pe).is_empty(), "PE {pe} must not see the LPI");
    }
    assert!(d.gic.irq_line(2));
    assert_eq!(d.drain(2), vec![8200], "delivered exactly once");
    assert!(
        !d.pending_bit(2, 8200),
        "acknowledge clears the pending table bit"
    );
    assert!(!d.gic.irq_line(2));
}

#[test]
fn disabled_lpi_is_not_delivered_until_enabled_and_invalidated() {
    let mut d = Driver::bare(2);
    d.fill_prop(false);
    d.enable_cpus();
    d.enable_lpis();
    d.enable_its();
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8195,
            icid: 1,
        },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
    ]);
    assert!(
        d.gic.is_pending(1, 8195),
        "a disabled LPI still becomes pending"
    );
    assert!(d.drain(1).is_empty(), "but is not delivered");
    // Software enables it in memory but forgets to invalidate: the cached config wins.
    d.set_lpi_config(8195, LPI_PRIO | LPI_PROP_GROUP1 | LPI_PROP_ENABLE);
    d.cmds(&[ItsCommand::Int {
        device: 0,
        event: 0,
    }]);
    assert!(
        d.drain(1).is_empty(),
        "stale cached configuration: still disabled"
    );
    assert!(!d.gic.irq_line(1));
    // INV makes the change visible and the pending LPI is delivered once.
    d.cmds(&[ItsCommand::Inv {
        device: 0,
        event: 0,
    }]);
    assert!(d.gic.irq_line(1));
    assert_eq!(d.drain(1), vec![8195]);
    assert!(d.drain(0).is_empty());
}

#[test]
fn invall_and_redistributor_invalidation_refresh_the_cache() {
    let mut d = Driver::bare(2);
    d.fill_prop(false);
    d.enable_cpus();
    d.enable_lpis();
    d.enable_its();
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 1,
            intid: 9000,
            icid: 0,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 2,
            intid: 9001,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 1,
        },
        ItsCommand::Int {
            device: 0,
            event: 2,
        },
    ]);
    d.set_lpi_config(9000, LPI_PRIO | 3);
    d.set_lpi_config(9001, LPI_PRIO | 3);
    assert!(d.drain(0).is_empty());
    // GICR_INVLPIR refreshes exactly one LPI.
    let rd = d.rd(0);
    d.w64(rd + GICR_INVLPIR, 9001);
    assert_eq!(
        d.r32(rd + GICR_SYNCR),
        0,
        "SYNCR.Busy clear: invalidation complete"
    );
    assert_eq!(d.drain(0), vec![9001]);
    // INVALL refreshes the rest.
    d.cmds(&[ItsCommand::Invall { icid: 0 }]);
    assert_eq!(d.drain(0), vec![9000]);
    // GICR_INVALLR after disabling in memory: a new INT is not delivered.
    d.set_lpi_config(9000, LPI_PRIO | 2);
    d.w64(rd + GICR_INVALLR, 0);
    d.cmds(&[ItsCommand::Int {
        device: 0,
        event: 1,
    }]);
    assert!(d.drain(0).is_empty());
    assert!(d.gic.is_pending(0, 9000));
}

#[test]
fn lpi_priority_arbitration_delivers_highest_priority_first() {
    let mut d = Driver::booted(1);
    d.map_basic(1);
    d.set_lpi_config(8300, 0x80 | 3);
    d.set_lpi_config(8301, 0x40 | 3);
    d.set_lpi_config(8302, 0x40 | 3);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8300,
            icid: 0,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 1,
            intid: 8301,
            icid: 0,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 2,
            intid: 8302,
            icid: 0,
        },
        ItsCommand::Invall { icid: 0 },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 2,
        },
        ItsCommand::Int {
            device: 0,
            event: 1,
        },
    ]);
    // 0x40 beats 0x80; equal priorities go lowest INTID first.
    assert_eq!(d.drain(0), vec![8301, 8302, 8300]);
}

#[test]
fn mapd_with_v0_stops_delivery_and_reports_unmapped_device() {
    let mut d = Driver::booted(2);
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 3,
            intid: 8192,
            icid: 1,
        },
        ItsCommand::Int {
            device: 0,
            event: 3,
        },
    ]);
    assert_eq!(d.drain(1), vec![8192]);
    d.cmds(&[
        ItsCommand::Mapd {
            device: 0,
            size: 0,
            itt: 0,
            valid: false,
        },
        ItsCommand::Int {
            device: 0,
            event: 3,
        },
    ]);
    assert!(d.drain(1).is_empty());
    assert_eq!(d.last_its_error(), Some(ItsCommandError::UnmappedDevice(0)));
    assert_eq!(d.creadr(), d.slot * 32, "errors do not stall the queue");
    // An MSI is dropped the same way.
    assert!(d.gic.send_msi(0, 0, 3).is_err());
    assert!(d.drain(1).is_empty());
}

#[test]
fn movi_moves_mapping_and_pending_state_to_the_new_collection() {
    let mut d = Driver::booted(2);
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 7,
            intid: 8250,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 7,
        },
    ]);
    // Mask PE 0 so the LPI stays pending there, then move it.
    d.gic.icc_write(0, gic::IccReg::Pmr, 0).unwrap();
    d.cmds(&[ItsCommand::Movi {
        device: 0,
        event: 7,
        icid: 1,
    }]);
    assert!(!d.gic.is_pending(0, 8250));
    assert!(!d.pending_bit(0, 8250));
    assert!(d.gic.is_pending(1, 8250), "pending state follows the event");
    assert!(d.pending_bit(1, 8250));
    assert_eq!(d.drain(1), vec![8250]);
    // Later INTs go to the new collection.
    d.cmds(&[ItsCommand::Int {
        device: 0,
        event: 7,
    }]);
    assert_eq!(d.drain(1), vec![8250]);
    d.gic.icc_write(0, gic::IccReg::Pmr, 0xff).unwrap();
    assert!(d.drain(0).is_empty());
}

#[test]
fn discard_removes_pending_state_and_mapping() {
    let mut d = Driver::booted(1);
    d.map_basic(1);
    d.gic.icc_write(0, gic::IccReg::Pmr, 0).unwrap();
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 9,
            intid: 8400,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 9,
        },
        ItsCommand::Discard {
            device: 0,
            event: 9,
        },
    ]);
    assert!(!d.gic.is_pending(0, 8400));
    assert!(!d.pending_bit(0, 8400));
    d.gic.icc_write(0, gic::IccReg::Pmr, 0xff).unwrap();
    d.cmds(&[ItsCommand::Int {
        device: 0,
        event: 9,
    }]);
    assert!(d.drain(0).is_empty());
    assert_eq!(
        d.last_its_error(),
        Some(ItsCommandError::UnmappedEvent {
            device: 0,
            event: 9
        })
    );
}

#[test]
fn clear_removes_pending_state_without_unmapping() {
    let mut d = Driver::booted(1);
    d.map_basic(1);
    d.gic.icc_write(0, gic::IccReg::Pmr, 0).unwrap();
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 1,
            intid: 8500,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 1,
        },
        ItsCommand::Clear {
            device: 0,
            event: 1,
        },
    ]);
    assert!(!d.gic.is_pending(0, 8500));
    d.gic.icc_write(0, gic::IccReg::Pmr, 0xff).unwrap();
    d.cmds(&[ItsCommand::Int {
        device: 0,
        event: 1,
    }]);
    assert_eq!(d.drain(0), vec![8500]);
}

#[test]
fn movall_moves_every_pending_lpi_between_redistributors() {
    let mut d = Driver::booted(2);
    d.map_basic(1);
    d.gic.icc_write(0, gic::IccReg::Pmr, 0).unwrap();
    let mut v = Vec::new();
    for e in 0..5 {
        v.push(ItsCommand::Mapti {
            device: 0,
            event: e,
            intid: 8600 + e,
            icid: 0,
        });
        v.push(ItsCommand::Int {
            device: 0,
            event: e,
        });
    }
    d.cmds(&v);
    assert_eq!(d.gic.pending_lpis(0).len(), 5);
    d.cmds(&[ItsCommand::Movall {
        rdbase1: 0,
        rdbase2: 1,
    }]);
    assert!(d.gic.pending_lpis(0).is_empty());
    assert_eq!(d.drain(1), vec![8600, 8601, 8602, 8603, 8604]);
}

#[test]
fn mapi_uses_the_event_id_as_intid() {
    let mut d = Driver::booted(1);
    d.cmds(&[
        ItsCommand::Mapc {
            icid: 0,
            rdbase: 0,
            valid: true,
        },
        ItsCommand::Mapd {
            device: 3,
            size: 15,
            itt: ITT,
            valid: true,
        },
        ItsCommand::Mapi {
            device: 3,
            event: 8193,
            icid: 0,
        },
        ItsCommand::Int {
            device: 3,
            event: 8193,
        },
    ]);
    assert_eq!(d.drain(0), vec![8193]);
}

#[test]
fn command_errors_are_recorded_and_skipped() {
    let mut d = Driver::booted(2);
    d.map_basic(1);
    let before = d.its_error_count();
    d.cmds(&[
        // EventID beyond the 8 bits the device was mapped with.
        ItsCommand::Mapti {
            device: 0,
            event: 256,
            intid: 8192,
            icid: 0,
        },
        // INTID below the LPI range.
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 100,
            icid: 0,
        },
        // Collection beyond the collection table (64 KiB / 8 bytes = 8192 entries).
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8192,
            icid: 9000,
        },
        // Unmapped collection.
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8192,
            icid: 7,
        },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
        // DeviceID beyond Devbits.
        ItsCommand::Mapd {
            device: 1 << 16,
            size: 1,
            itt: ITT,
            valid: true,
        },
        // MAPD Size beyond IDbits.
        ItsCommand::Mapd {
            device: 1,
            size: 16,
            itt: ITT,
            valid: true,
        },
        // RDbase naming no PE.
        ItsCommand::Mapc {
            icid: 3,
            rdbase: 9,
            valid: true,
        },
        ItsCommand::Unknown { opcode: 0x2a },
    ]);
    let (records, total) = d.gic.its_errors(0).unwrap();
    // MAPTI to an unmapped (but in-range) collection is legal; the INT through it is not.
    let want = vec![
        ItsCommandError::EventOutOfRange {
            device: 0,
            event: 256,
        },
        ItsCommandError::IntIdOutOfRange(100),
        ItsCommandError::CollectionOutOfRange(9000),
        ItsCommandError::UnmappedCollection(7),
        ItsCommandError::DeviceOutOfRange(1 << 16),
        ItsCommandError::IttSizeOutOfRange(16),
        ItsCommandError::RdbaseOutOfRange(9),
        ItsCommandError::UnknownCommand(0x2a),
    ];
    assert_eq!(total - before, want.len() as u64);
    let errs: Vec<_> = records
        .iter()
        .rev()
        .take(want.len())
        .rev()
        .map(|r| r.error)
        .collect();
    assert_eq!(errs, want);
    assert_eq!(d.creadr() & GITS_CREADR_STALLED, 0);
    assert_eq!(d.creadr(), d.slot * 32);
}

#[test]
fn unbacked_table_memory_stalls_the_queue_until_retry() {
    let mut d = Driver::booted(1);
    d.map_basic(0);
    // Point device 0's ITT outside guest RAM.
    d.cmds(&[
        ItsCommand::Mapd {
            device: 0,
            size: 3,
            itt: 0x1000_0000,
            valid: true,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8192,
            icid: 0,
        },
        ItsCommand::Sync { rdbase: 0 },
    ]);
    let creadr = d.creadr();
    assert_eq!(creadr & GITS_CREADR_STALLED, 1, "stalled");
    let stalled_at = creadr & !1;
    assert_eq!(
        stalled_at,
        (d.slot - 2) * 32,
        "CREADR points at the failing MAPTI"
    );
    assert!(matches!(
        d.last_its_error(),
        Some(ItsCommandError::Memory(_))
    ));
    // Fix the command in place (MAPD to a good ITT is before it, so rewrite the MAPTI slot
    // as a MAPD) and retry.
    let fixed = ItsCommand::Mapd {
        device: 0,
        size: 3,
        itt: ITT,
        valid: true,
    };
    d.gic
        .mem_mut()
        .write(CMDQ + stalled_at, &fixed.to_bytes())
        .unwrap();
    let cw = d.slot * 32;
    d.w64(GITS + GITS_CWRITER, cw);
    assert_eq!(
        d.creadr() & 1,
        1,
        "a CWRITER write without Retry keeps the stall"
    );
    d.w64(GITS + GITS_CWRITER, cw | GITS_CWRITER_RETRY);
    assert_eq!(d.creadr(), cw, "retry resumed and drained the queue");
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8192,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
    ]);
    assert_eq!(d.drain(0), vec![8192]);
}

#[test]
fn two_level_device_table_needs_a_valid_level1_entry() {
    let mut d = Driver::bare(1);
    d.fill_prop(true);
    d.enable_cpus();
    d.enable_lpis();
    // 4 KiB pages: 512 DTEs per level-2 page. L1 table at DT, one page.
    let l2 = RAM + 0x8_0000;
    d.gic
        .mem_mut()
        .write(DT + 8 * 2, &(GITS_L1E_VALID | l2).to_le_bytes())
        .unwrap();
    d.w64(
        GITS + GITS_BASER,
        GITS_BASER_VALID | GITS_BASER_INDIRECT | DT,
    );
    d.w64(GITS + GITS_BASER + 8, GITS_BASER_VALID | CT);
    d.w64(GITS + GITS_CBASER, GITS_CBASER_VALID | CMDQ);
    d.w32(GITS + GITS_CTLR, GITS_CTLR_ENABLED);
    d.cmds(&[
        ItsCommand::Mapc {
            icid: 0,
            rdbase: 0,
            valid: true,
        },
        // Device 1030 lives in L1 entry 2 (1030 / 512): valid.
        ItsCommand::Mapd {
            device: 1030,
            size: 3,
            itt: ITT,
            valid: true,
        },
        // Device 5 lives in L1 entry 0: no level-2 page.
        ItsCommand::Mapd {
            device: 5,
            size: 3,
            itt: ITT,
            valid: true,
        },
        ItsCommand::Mapti {
            device: 1030,
            event: 2,
            intid: 8900,
            icid: 0,
        },
        ItsCommand::Int {
            device: 1030,
            event: 2,
        },
    ]);
    assert_eq!(d.its_error_count(), 1);
    assert_eq!(d.last_its_error(), Some(ItsCommandError::UnmappedDevice(5)));
    let mut dte = [0u8; 8];
    d.gic.mem().read(l2 + (1030 % 512) * 8, &mut dte).unwrap();
    assert_eq!(
        u64::from_le_bytes(dte),
        ITT | (3 << 1) | 1,
        "documented DTE layout"
    );
    assert_eq!(d.drain(0), vec![8900]);
}

#[test]
fn table_entries_use_the_documented_layouts() {
    let mut d = Driver::booted(2);
    d.cmds(&[
        ItsCommand::Mapc {
            icid: 5,
            rdbase: 1,
            valid: true,
        },
        ItsCommand::Mapd {
            device: 2,
            size: 4,
            itt: ITT + 0x100,
            valid: true,
        },
        ItsCommand::Mapti {
            device: 2,
            event: 3,
            intid: 0x2345,
            icid: 5,
        },
    ]);
    let read64 = |d: &Driver, a: u64| {
        let mut b = [0u8; 8];
        d.gic.mem().read(a, &mut b).unwrap();
        u64::from_le_bytes(b)
    };
    assert_eq!(
        read64(&d, CT + 5 * 8),
        1 | (1 << 16),
        "CTE: Valid, RDbase[51:16]"
    );
    assert_eq!(read64(&d, DT + 2 * 8), 1 | (4 << 1) | (ITT + 0x100), "DTE");
    assert_eq!(
        read64(&d, ITT + 0x100 + 3 * 16),
        1 | (1 << 1) | (5 << 16) | (0x2345 << 32),
        "ITE: Valid, type physical, ICID[31:16], INTID[63:32]"
    );
}

#[test]
fn pta_targeting_uses_redistributor_addresses() {
    let mut cfg = GicConfig::virt(3);
    cfg.its = vec![ItsConfig {
        pta: true,
        ..ItsConfig::default()
    }];
    let mut d = Driver::bare_with(cfg);
    d.fill_prop(true);
    d.enable_cpus();
    d.enable_lpis();
    d.enable_its();
    assert_ne!(d.r64(GITS + GITS_TYPER) & GITS_TYPER_PTA, 0);
    let rd2 = d.rd(2) >> 16;
    d.cmds(&[
        ItsCommand::Mapc {
            icid: 0,
            rdbase: rd2,
            valid: true,
        },
        ItsCommand::Mapc {
            icid: 1,
            rdbase: 2,
            valid: true,
        },
        ItsCommand::Mapd {
            device: 0,
            size: 3,
            itt: ITT,
            valid: true,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8192,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
        ItsCommand::Sync { rdbase: rd2 },
    ]);
    assert_eq!(
        d.last_its_error(),
        Some(ItsCommandError::RdbaseOutOfRange(2))
    );
    assert_eq!(d.its_error_count(), 1);
    assert_eq!(d.drain(2), vec![8192]);
}

#[test]
fn translater_write_uses_configured_device_id() {
    let mut d = Driver::booted(1);
    d.map_basic(3);
    d.cmds(&[ItsCommand::Mapti {
        device: 2,
        event: 4,
        intid: 8777,
        icid: 0,
    }]);
    d.gic.set_msi_device_id(2);
    d.w32(GITS + GITS_TRANSLATER, 4);
    assert_eq!(d.drain(0), vec![8777]);
    // 16-bit writes are architected too.
    d.gic.write(GITS + GITS_TRANSLATER, 2, 4).unwrap();
    assert_eq!(d.drain(0), vec![8777]);
    // Translation while the ITS is disabled is dropped.
    d.w32(GITS + GITS_CTLR, 0);
    assert_eq!(d.r32(GITS + GITS_CTLR), GITS_CTLR_QUIESCENT);
    d.w32(GITS + GITS_TRANSLATER, 4);
    assert!(d.drain(0).is_empty());
    assert_eq!(d.last_its_error(), Some(ItsCommandError::Disabled));
}

#[test]
fn queue_is_not_processed_while_disabled_and_resumes_on_enable() {
    let mut d = Driver::booted(1);
    d.w32(GITS + GITS_CTLR, 0);
    d.cmds(&[ItsCommand::Mapc {
        icid: 0,
        rdbase: 0,
        valid: true,
    }]);
    assert_eq!(d.creadr(), 0);
    // Enabling runs what was queued while disabled.
    d.w32(GITS + GITS_CTLR, GITS_CTLR_ENABLED);
    assert_eq!(d.creadr(), 32);
    let cb = d.r64(GITS + GITS_CBASER);
    d.w64(GITS + GITS_CBASER, 0);
    assert_eq!(d.r64(GITS + GITS_CBASER), cb, "CBASER is WI while enabled");
}

#[test]
fn model_writes_are_reported_in_the_write_log() {
    let mut d = Driver::booted(1);
    let mut pages = Vec::new();
    d.gic.write_log().drain_pages_into(&mut pages);
    pages.clear();
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8192,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
    ]);
    d.gic.write_log().drain_pages_into(&mut pages);
    // CTE page, DTE page, ITT page, pending table page: exactly these.
    // INTID 8192's pending bit is at byte 1024 of the pending table: its first page.
    let mut want = vec![CT, DT, ITT, PEND];
    want.sort();
    assert_eq!(pages, want);
    d.gic.write_log().drain_pages_into(&mut pages);
    assert_eq!(pages.len(), 4, "drain empties the log");
}

#[test]
fn two_its_instances_translate_independently() {
    let mut cfg = GicConfig::virt(2);
    let its1 = 0x0810_0000;
    cfg.its.push(ItsConfig {
        base: its1,
        device_bits: 8,
        event_bits: 8,
        pta: false,
    });
    let mut d = Driver::bare_with(cfg);
    d.fill_prop(true);
    d.enable_cpus();
    d.enable_lpis();
    d.enable_its();
    d.map_basic(1);
    d.cmds(&[ItsCommand::Mapti {
        device: 0,
        event: 0,
        intid: 8192,
        icid: 0,
    }]);
    // Second ITS: its own tables and queue in a separate part of RAM.
    let base = RAM + 0x30_0000;
    let typer = d.r64(its1 + GITS_TYPER);
    assert_eq!((typer >> 13) & 0x1F, 7, "8 DeviceID bits on ITS 1");
    d.w64(its1 + GITS_BASER, GITS_BASER_VALID | base);
    d.w64(its1 + GITS_BASER + 8, GITS_BASER_VALID | (base + 0x1000));
    d.w64(its1 + GITS_CBASER, GITS_CBASER_VALID | (base + 0x2000));
    d.w32(its1 + GITS_CTLR, GITS_CTLR_ENABLED);
    let cmds = [
        ItsCommand::Mapc {
            icid: 0,
            rdbase: 1,
            valid: true,
        },
        ItsCommand::Mapd {
            device: 0,
            size: 3,
            itt: base + 0x3000,
            valid: true,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8193,
            icid: 0,
        },
    ];
    for (i, c) in cmds.iter().enumerate() {
        d.gic
            .mem_mut()
            .write(base + 0x2000 + 32 * i as u64, &c.to_bytes())
            .unwrap();
    }
    d.w64(its1 + GITS_CWRITER, 32 * cmds.len() as u64);
    assert_eq!(d.r64(its1 + GITS_CREADR), 32 * cmds.len() as u64);
    // Same DeviceID/EventID, different ITS, different LPI and PE.
    d.gic.send_msi(0, 0, 0).unwrap();
    d.gic.send_msi(1, 0, 0).unwrap();
    assert_eq!(d.drain(0), vec![8192]);
    assert_eq!(d.drain(1), vec![8193]);
    assert!(matches!(
        d.gic.send_msi(2, 0, 0),
        Err(gic::MsiError::NoSuchIts(2))
    ));
}

#[test]
fn write_hook_sees_every_model_write_with_its_length() {
    use std::sync::{Arc, Mutex};
    let mut d = Driver::booted(1);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = Arc::clone(&seen);
    d.gic
        .write_log()
        .set_hook(Some(Box::new(move |a, l| s2.lock().unwrap().push((a, l)))));
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 1,
            intid: 8193,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 1,
        },
    ]);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (CT, 8),              // MAPC: CTE
            (DT, 8),              // MAPD: DTE
            (ITT + 16, 16),       // MAPTI: ITE
            (PEND + 8193 / 8, 1), // INT: pending bit
        ]
    );
    assert_eq!(d.drain(0), vec![8193]);
    assert_eq!(
        seen.lock().unwrap().last(),
        Some(&(PEND + 8193 / 8, 1)),
        "ack clears the bit"
    );
    assert_eq!(seen.lock().unwrap().len(), 5);
}

#[test]
fn mapc_with_v0_stops_delivery_until_the_collection_is_remapped() {
    let mut d = Driver::booted(4);
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 20,
            intid: 8195,
            icid: 3,
        },
        ItsCommand::Mapc {
            icid: 3,
            rdbase: 0,
            valid: false,
        },
        ItsCommand::Int {
            device: 0,
            event: 20,
        },
    ]);
    assert_eq!(
        d.last_its_error(),
        Some(ItsCommandError::UnmappedCollection(3))
    );
    for pe in 0..4 {
        assert!(d.drain(pe).is_empty(), "PE {pe}");
    }
    // Remapping the collection to another PE retargets the event without touching the ITE.
    d.cmds(&[
        ItsCommand::Mapc {
            icid: 3,
            rdbase: 2,
            valid: true,
        },
        ItsCommand::Int {
            device: 0,
            event: 20,
        },
    ]);
    assert_eq!(d.drain(2), vec![8195]);
    assert!(d.drain(3).is_empty());
}

#[test]
fn reenabled_lpi_is_delivered_again_after_inv() {
    let mut d = Driver::booted(1);
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8196,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
    ]);
    assert_eq!(d.drain(0), vec![8196]);
    d.set_lpi_config(8196, LPI_PRIO | LPI_PROP_GROUP1);
    d.cmds(&[
        ItsCommand::Inv {
            device: 0,
            event: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
    ]);
    assert!(
        d.drain(0).is_empty(),
        "disabled and invalidated: not delivered"
    );
    d.set_lpi_config(8196, LPI_PRIO | LPI_PROP_GROUP1 | LPI_PROP_ENABLE);
    d.cmds(&[ItsCommand::Inv {
        device: 0,
        event: 0,
    }]);
    assert_eq!(
        d.drain(0),
        vec![8196],
        "the pending LPI arrives once re-enabled"
    );
    d.cmds(&[ItsCommand::Int {
        device: 0,
        event: 0,
    }]);
    assert_eq!(d.drain(0), vec![8196]);
}

#[test]
fn two_level_collection_table_with_16k_pages() {
    let mut d = Driver::bare(2);
    d.fill_prop(true);
    d.enable_cpus();
    d.enable_lpis();
    // 16 KiB pages: 2048 CTEs per level-2 page; L1 entry 1 covers ICIDs 2048..4095.
    let l2 = RAM + 0x8_0000; // 16 KiB aligned
    d.gic
        .mem_mut()
        .write(CT + 8, &(GITS_L1E_VALID | l2).to_le_bytes())
        .unwrap();
    d.w64(GITS + GITS_BASER, GITS_BASER_VALID | (2 << 8) | DT);
    d.w64(
        GITS + GITS_BASER + 8,
        GITS_BASER_VALID | GITS_BASER_INDIRECT | (1 << 8) | CT,
    );
    assert_eq!((d.r64(GITS + GITS_BASER + 8) >> 8) & 3, 1, "16 KiB pages");
    d.w64(GITS + GITS_CBASER, GITS_CBASER_VALID | CMDQ);
    d.w32(GITS + GITS_CTLR, GITS_CTLR_ENABLED);
    d.cmds(&[
        ItsCommand::Mapc {
            icid: 3000,
            rdbase: 1,
            valid: true,
        },
        ItsCommand::Mapc {
            icid: 5,
            rdbase: 0,
            valid: true,
        },
        ItsCommand::Mapd {
            device: 0,
            size: 3,
            itt: ITT,
            valid: true,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 0,
            intid: 8192,
            icid: 3000,
        },
        ItsCommand::Int {
            device: 0,
            event: 0,
        },
    ]);
    assert_eq!(d.its_error_count(), 1);
    assert_eq!(
        d.last_its_error(),
        Some(ItsCommandError::CollectionOutOfRange(5))
    );
    let mut cte = [0u8; 8];
    d.gic.mem().read(l2 + (3000 - 2048) * 8, &mut cte).unwrap();
    assert_eq!(u64::from_le_bytes(cte), 1 | (1 << 16));
    assert_eq!(d.drain(1), vec![8192]);
}

/// B1 (issue 16). Linux's `its_set_affinity` sends MOVI with no INV after it. The ITS
/// (IHI 0069, "MOVI": the ITE is retargeted and any pending state follows it) must leave the
/// new redistributor with a configuration consistent with the LPI Configuration table that
/// was last invalidated ("INV": cached configuration is made consistent with memory for the
/// event's LPI). A redistributor that never saw the INV must not surface its stale copy.
#[test]
fn lpi_unmasked_on_one_rd_then_moved_by_movi_is_delivered_on_the_other() {
    let mut d = Driver::booted(2);
    d.fill_prop(false);
    d.map_basic(1);
    // Both RDs cache the all-disabled table.
    d.cmds(&[
        ItsCommand::Invall { icid: 0 },
        ItsCommand::Invall { icid: 1 },
    ]);
    d.cmds(&[ItsCommand::Mapti {
        device: 0,
        event: 3,
        intid: 8300,
        icid: 0,
    }]);
    // Unmask while the LPI targets RD0: INV reaches RD0 only.
    d.set_lpi_config(8300, LPI_PRIO | LPI_PROP_GROUP1 | LPI_PROP_ENABLE);
    d.cmds(&[ItsCommand::Inv {
        device: 0,
        event: 3,
    }]);
    d.cmds(&[
        ItsCommand::Movi {
            device: 0,
            event: 3,
            icid: 1,
        },
        ItsCommand::Int {
            device: 0,
            event: 3,
        },
    ]);
    assert_eq!(d.its_error_count(), 0);
    assert_eq!(d.drain(1), vec![8300], "delivered at the new RD");
    assert!(d.drain(0).is_empty());
}

/// B1 for MOVALL: every LPI moved carries a configuration consistent with memory at the
/// destination (IHI 0069, "MOVALL").
#[test]
fn lpis_moved_by_movall_use_the_invalidated_configuration() {
    let mut d = Driver::booted(2);
    d.fill_prop(false);
    d.map_basic(1);
    d.cmds(&[
        ItsCommand::Invall { icid: 0 },
        ItsCommand::Invall { icid: 1 },
        ItsCommand::Mapti {
            device: 0,
            event: 1,
            intid: 8301,
            icid: 0,
        },
    ]);
    d.set_lpi_config(8301, LPI_PRIO | LPI_PROP_GROUP1 | LPI_PROP_ENABLE);
    d.cmds(&[
        ItsCommand::Inv {
            device: 0,
            event: 1,
        },
        ItsCommand::Int {
            device: 0,
            event: 1,
        },
    ]);
    d.gic.icc_write(0, gic::IccReg::Pmr, 0).unwrap();
    d.cmds(&[ItsCommand::Movall {
        rdbase1: 0,
        rdbase2: 1,
    }]);
    assert_eq!(d.drain(1), vec![8301]);
}

/// B4 (issue 16). MOVI/MOVALL to a redistributor whose GICR_CTLR.EnableLPIs is 0: an LPI
/// forwarded to such a redistributor is outside the architected behaviour (IHI 0069,
/// GICR_CTLR.EnableLPIs: "LPI support is disabled"; MOVI/MOVALL move pending state, they
/// never discard it). The model chooses the outcome that loses nothing and matches QEMU:
/// the interrupt stays pending at the source, in the model and in its pending table.
#[test]
fn movi_and_movall_to_a_redistributor_without_lpis_leave_the_lpi_pending_at_the_source() {
    let mut d = Driver::bare(2);
    d.fill_prop(true);
    d.enable_cpus();
    let rd0 = d.rd(0);
    d.w64(rd0 + GICR_PROPBASER, PROP | 15);
    d.w64(rd0 + GICR_PENDBASER, PEND);
    d.w32(rd0 + GICR_CTLR, GICR_CTLR_ENABLE_LPIS);
    d.enable_its();
    d.map_basic(1);
    d.gic.icc_write(0, gic::IccReg::Pmr, 0).unwrap();
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 2,
            intid: 8400,
            icid: 0,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 4,
            intid: 8401,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 2,
        },
        ItsCommand::Int {
            device: 0,
            event: 4,
        },
        ItsCommand::Movi {
            device: 0,
            event: 2,
            icid: 1,
        },
    ]);
    assert!(d.gic.is_pending(0, 8400), "MOVI left it pending at RD0");
    assert!(d.pending_bit(0, 8400));
    d.cmds(&[ItsCommand::Movall {
        rdbase1: 0,
        rdbase2: 1,
    }]);
    assert!(d.gic.is_pending(0, 8401), "MOVALL left it pending at RD0");
    assert!(d.pending_bit(0, 8401));
    d.gic.icc_write(0, gic::IccReg::Pmr, 0xff).unwrap();
    let mut got = d.drain(0);
    got.sort();
    assert_eq!(got, vec![8400, 8401], "nothing lost");
}
