//! Save/restore in the middle of traffic loses nothing: kvm-unit-tests `its-migration`,
//! `its-pending-migration` and `its-migrate-unmapped-collection`, plus CPU-interface state.

mod common;

use common::*;
use gic::regs::*;
use gic::{Gic, GicState, IccReg, ItsCommand, StateError};

/// Round-trips the model through JSON (as a migration stream would carry it).
fn migrate(d: &Driver) -> Driver {
    let st = d.gic.state();
    let json = serde_json::to_string(&st).expect("serialize");
    let back: GicState = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, st);
    let mem = d.gic.mem().clone();
    let gic = Gic::from_state(&back, mem).expect("restore");
    assert_eq!(gic.state(), st, "restore is lossless");
    Driver { gic, slot: d.slot }
}

fn sgi1r(intid: u64, list: u64) -> u64 {
    (intid << 24) | list
}

#[test]
fn pending_lpis_and_mappings_survive_migration() {
    let mut d = Driver::booted(2);
    d.map_basic(2);
    let mut cmds = Vec::new();
    for e in 0..8 {
        cmds.push(ItsCommand::Mapti {
            device: e % 2,
            event: e,
            intid: 8192 + e,
            icid: (e % 2) as u16,
        });
    }
    d.cmds(&cmds);
    // Mask both PEs and make half the LPIs pending before migration.
    for pe in 0..2 {
        d.gic.icc_write(pe, IccReg::Pmr, 0).unwrap();
    }
    d.cmds(
        &(0..4)
            .map(|e| ItsCommand::Int {
                device: e % 2,
                event: e,
            })
            .collect::<Vec<_>>(),
    );
    let mut m = migrate(&d);
    // The other half after migration, on the destination.
    m.cmds(
        &(4..8)
            .map(|e| ItsCommand::Int {
                device: e % 2,
                event: e,
            })
            .collect::<Vec<_>>(),
    );
    for pe in 0..2 {
        m.gic.icc_write(pe, IccReg::Pmr, 0xFF).unwrap();
    }
    assert_eq!(m.drain(0), vec![8192, 8194, 8196, 8198]);
    assert_eq!(m.drain(1), vec![8193, 8195, 8197, 8199]);
}

#[test]
fn stale_lpi_configuration_cache_survives_migration() {
    // The cache is state outside memory: a destination must not silently refresh it.
    let mut d = Driver::bare(1);
    d.fill_prop(false);
    d.enable_cpus();
    d.enable_lpis();
    d.enable_its();
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
    d.set_lpi_config(8192, LPI_PRIO | 3);
    let mut m = migrate(&d);
    assert!(
        m.drain(0).is_empty(),
        "still the cached (disabled) configuration"
    );
    m.cmds(&[ItsCommand::Inv {
        device: 0,
        event: 0,
    }]);
    assert_eq!(m.drain(0), vec![8192]);
}

#[test]
fn unmapped_collection_mapped_after_migration_then_delivers() {
    let mut d = Driver::booted(2);
    d.cmds(&[
        ItsCommand::Mapd {
            device: 0,
            size: 3,
            itt: ITT,
            valid: true,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 1,
            intid: 8500,
            icid: 1,
        },
        ItsCommand::Int {
            device: 0,
            event: 1,
        },
    ]);
    assert_eq!(
        d.last_its_error(),
        Some(gic::ItsCommandError::UnmappedCollection(1))
    );
    let mut m = migrate(&d);
    assert_eq!(
        m.gic.its_errors(0).unwrap(),
        d.gic.its_errors(0).unwrap(),
        "error records migrate"
    );
    m.cmds(&[
        ItsCommand::Mapc {
            icid: 1,
            rdbase: 1,
            valid: true,
        },
        ItsCommand::Int {
            device: 0,
            event: 1,
        },
    ]);
    assert_eq!(m.drain(1), vec![8500]);
}

#[test]
fn queued_but_unprocessed_commands_run_after_migration() {
    let mut d = Driver::booted(1);
    d.map_basic(1);
    // Disable the ITS, queue commands, migrate, enable on the destination.
    d.w32(GITS + GITS_CTLR, 0);
    d.cmds(&[
        ItsCommand::Mapti {
            device: 0,
            event: 2,
            intid: 8800,
            icid: 0,
        },
        ItsCommand::Int {
            device: 0,
            event: 2,
        },
    ]);
    let before = d.creadr();
    assert_ne!(before, d.slot * 32);
    let mut m = migrate(&d);
    assert_eq!(m.creadr(), before);
    m.w32(GITS + GITS_CTLR, GITS_CTLR_ENABLED);
    assert_eq!(m.creadr(), m.slot * 32);
    assert_eq!(m.drain(0), vec![8800]);
}

#[test]
fn active_and_pending_sgis_and_running_priority_survive_migration() {
    let mut d = Driver::bare(2);
    d.enable_cpus();
    for pe in 0..2 {
        let sgi = d.sgi(pe);
        d.w32(sgi + GICR_IGROUPR0, 0xFFFF);
        d.w32(sgi + GICR_ISENABLER0, 0xFFFF);
    }
    d.gic.icc_write(0, IccReg::Ctlr, ICC_CTLR_EOIMODE).unwrap();
    d.gic.icc_write(1, IccReg::Sgi1r, sgi1r(3, 1)).unwrap();
    assert_eq!(d.iar(0), 3);
    d.gic.icc_write(1, IccReg::Sgi1r, sgi1r(3, 1)).unwrap();
    d.gic.icc_write(1, IccReg::Sgi1r, sgi1r(4, 1)).unwrap();
    let mut m = migrate(&d);
    assert_eq!(m.gic.icc_read(0, IccReg::Rpr).unwrap(), 0);
    assert!(m.gic.is_active(0, 3) && m.gic.is_pending(0, 3));
    // EOImode survives: EOI drops priority, DIR deactivates.
    m.eoi(0, 3);
    assert!(m.gic.is_active(0, 3));
    m.gic.icc_write(0, IccReg::Dir, 3).unwrap();
    let got: Vec<u32> = (0..2)
        .map(|_| {
            let i = m.iar(0);
            m.eoi(0, i);
            m.gic.icc_write(0, IccReg::Dir, i as u64).unwrap();
            i
        })
        .collect();
    assert_eq!(got, vec![3, 4]);
    assert_eq!(m.iar(0), INTID_SPURIOUS);
}

#[test]
fn restore_rejects_inconsistent_state() {
    let d = Driver::booted(2);
    let mut st = d.gic.state();
    st.redists.pop();
    assert!(matches!(
        Gic::from_state(&st, d.gic.mem().clone()),
        Err(StateError::Length { .. })
    ));
    let mut st = d.gic.state();
    st.redists[0].lpi_pending.push(5);
    assert!(matches!(
        Gic::from_state(&st, d.gic.mem().clone()),
        Err(StateError::Range { .. })
    ));
    let mut st = d.gic.state();
    st.config.pe_affinities.clear();
    assert!(matches!(
        Gic::from_state(&st, d.gic.mem().clone()),
        Err(StateError::Config(_))
    ));
    let mut st = d.gic.state();
    st.version = 99;
    assert_eq!(
        Gic::from_state(&st, d.gic.mem().clone()).err(),
        Some(StateError::Version {
            got: 99,
            want: gic::GIC_STATE_VERSION
        })
    );
    let mut st = d.gic.state();
    st.dist.priority.push(0);
    assert!(Gic::from_state(&st, d.gic.mem().clone()).is_err());
}

#[test]
fn reset_returns_every_register_to_its_reset_state() {
    let fresh = Driver::bare(2).gic.state();
    let mut d = Driver::booted(2);
    d.map_basic(1);
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
    d.gic.icc_write(0, IccReg::Sgi1r, sgi1r(1, 1)).unwrap();
    assert!(d.gic.irq_line(1));
    d.gic.reset();
    assert_eq!(d.gic.state(), fresh);
    assert!(!d.gic.irq_line(0) && !d.gic.irq_line(1));
    assert!(!d.gic.irq_lines().level(1));
}
