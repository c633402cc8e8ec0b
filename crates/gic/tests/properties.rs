//! Property tests: random MMIO writes and ITS commands never panic; under random traffic
//! every interrupt is pending, active or delivered exactly as a shadow model says, never lost
//! and never duplicated, across save/restore.

mod common;

use std::collections::BTreeSet;

use common::*;
use gic::regs::*;
use gic::{Gic, IccReg, ItsCommand};
use proptest::prelude::*;

const PES: usize = 2;
const EVENTS: u32 = 8;
const SGI_PRIO: u8 = 0x80;
/// SGIs 4 and 5 are Group 0 (FIQ) at this higher priority; SGIs 0..3 are Group 1.
const G0_SGIS: u16 = 0b11_0000;
const G0_PRIO: u8 = 0x60;

#[derive(Debug, Clone)]
enum Op {
    /// INT command for an event.
    Int(u32),
    /// MSI through GITS_TRANSLATER (DeviceID 0).
    Msi(u32),
    /// CLEAR command.
    Clear(u32),
    /// MOVI an event to collection (= PE) c.
    Movi(u32, u16),
    /// SGI from a PE to a target list.
    Sgi(usize, u8, u16),
    /// Broadcast SGI.
    SgiAll(usize, u8),
    /// Acknowledge on a PE (ICC_IAR1).
    Ack(usize),
    /// Acknowledge a Group 0 interrupt on a PE (ICC_IAR0).
    AckFiq(usize),
    /// EOI of the most recent acknowledged interrupt on a PE.
    Eoi(usize),
    /// Priority mask.
    Pmr(usize, u8),
    /// Save and restore the whole model.
    Migrate,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..EVENTS).prop_map(Op::Int),
        (0..EVENTS).prop_map(Op::Msi),
        (0..EVENTS).prop_map(Op::Clear),
        (0..EVENTS, 0..PES as u16).prop_map(|(e, c)| Op::Movi(e, c)),
        (0..PES, 0..6u8, 0..4u16).prop_map(|(p, i, l)| Op::Sgi(p, i, l)),
        (0..PES, 0..6u8).prop_map(|(p, i)| Op::SgiAll(p, i)),
        (0..PES).prop_map(Op::Ack),
        (0..PES).prop_map(Op::AckFiq),
        (0..PES).prop_map(Op::Ack),
        (0..PES).prop_map(Op::Eoi),
        (0..PES, prop_oneof![Just(0u8), Just(0x90), Just(0xff)]).prop_map(|(p, v)| Op::Pmr(p, v)),
        Just(Op::Migrate),
    ]
}

/// What the architecture says the state must be.
#[derive(Default)]
struct Shadow {
    /// Collection (= PE) of each event.
    coll: Vec<usize>,
    /// Pending LPIs per PE.
    lpi: [BTreeSet<u32>; PES],
    /// Pending / active SGIs per PE.
    sgi_pending: [u16; PES],
    sgi_active: [u16; PES],
    /// Acknowledged, not yet EOI'd INTIDs per PE (innermost last).
    stack: [Vec<u32>; PES],
}

fn setup() -> Driver {
    let mut d = Driver::booted(PES);
    d.map_basic(1);
    let cmds: Vec<_> = (0..EVENTS)
        .map(|e| ItsCommand::Mapti {
            device: 0,
            event: e,
            intid: LPI_BASE + e,
            icid: (e as usize % PES) as u16,
        })
        .collect();
    d.cmds(&cmds);
    d.w32(GICD + GICD_CTLR, GICD_CTLR_ENABLE_G0 | GICD_CTLR_ENABLE_G1);
    for pe in 0..PES {
        let sgi = d.sgi(pe);
        d.w32(sgi + GICR_IGROUPR0, 0xFFFF & !(G0_SGIS as u32));
        d.w32(sgi + GICR_ISENABLER0, 0xFFFF);
        for i in 0..4 {
            d.w32(
                sgi + GICR_IPRIORITYR + 4 * i,
                u32::from_ne_bytes([SGI_PRIO; 4]),
            );
        }
        d.gic
            .write(sgi + GICR_IPRIORITYR + 4, 1, G0_PRIO as u64)
            .unwrap();
        d.gic
            .write(sgi + GICR_IPRIORITYR + 5, 1, G0_PRIO as u64)
            .unwrap();
        d.gic.icc_write(pe, IccReg::Igrpen0, 1).unwrap();
    }
    d
}

/// Completes interrupt `i` through its group's EOI register.
fn eoi(d: &mut Driver, pe: usize, i: u32) {
    let reg = if i < 16 && G0_SGIS & (1 << i) != 0 {
        IccReg::Eoir0
    } else {
        IccReg::Eoir1
    };
    d.gic.icc_write(pe, reg, i as u64).unwrap();
}

/// The fast path (recompute only the PEs an access can affect, running summaries) must
/// leave every PE exactly where a full recomputation would: a model rebuilt from the saved
/// state recomputes everything.
fn check_incremental_matches_full_recompute(d: &mut Driver) {
    let mut full = gic::Gic::from_state(&d.gic.state(), d.gic.mem().clone()).unwrap();
    for pe in 0..PES {
        assert_eq!(d.gic.irq_line(pe), full.irq_line(pe), "IRQ line of PE {pe}");
        assert_eq!(d.gic.fiq_line(pe), full.fiq_line(pe), "FIQ line of PE {pe}");
        for reg in [IccReg::Hppir1, IccReg::Hppir0] {
            assert_eq!(
                d.gic.icc_read(pe, reg).unwrap(),
                full.icc_read(pe, reg).unwrap(),
                "{reg:?} of PE {pe}"
            );
        }
    }
}

fn check_against_shadow(d: &Driver, s: &Shadow) {
    for pe in 0..PES {
        let lpis: BTreeSet<u32> = d.gic.pending_lpis(pe).into_iter().collect();
        assert_eq!(lpis, s.lpi[pe], "pending LPIs at PE {pe}");
        for i in 0..16 {
            assert_eq!(
                d.gic.is_pending(pe, i),
                s.sgi_pending[pe] & (1 << i) != 0,
                "SGI {i} pending on PE {pe}"
            );
            assert_eq!(
                d.gic.is_active(pe, i),
                s.sgi_active[pe] & (1 << i) != 0,
                "SGI {i} active on PE {pe}"
            );
        }
        for e in 0..EVENTS {
            let intid = LPI_BASE + e;
            assert_eq!(
                d.pending_bit(pe, intid),
                s.lpi[pe].contains(&intid),
                "pending table bit"
            );
        }
    }
}

fn run_ops(ops: &[Op]) {
    let mut d = setup();
    let mut s = Shadow {
        coll: (0..EVENTS as usize).map(|e| e % PES).collect(),
        ..Shadow::default()
    };
    for op in ops {
        match *op {
            Op::Int(e) | Op::Msi(e) => {
                if matches!(op, Op::Int(_)) {
                    d.cmds(&[ItsCommand::Int {
                        device: 0,
                        event: e,
                    }]);
                } else {
                    d.w32(GITS + GITS_TRANSLATER, e);
                }
                s.lpi[s.coll[e as usize]].insert(LPI_BASE + e);
            }
            Op::Clear(e) => {
                d.cmds(&[ItsCommand::Clear {
                    device: 0,
                    event: e,
                }]);
                s.lpi[s.coll[e as usize]].remove(&(LPI_BASE + e));
            }
            Op::Movi(e, c) => {
                d.cmds(&[ItsCommand::Movi {
                    device: 0,
                    event: e,
                    icid: c,
                }]);
                let old = s.coll[e as usize];
                if s.lpi[old].remove(&(LPI_BASE + e)) {
                    s.lpi[c as usize].insert(LPI_BASE + e);
                }
                s.coll[e as usize] = c as usize;
            }
            Op::Sgi(from, i, list) => {
                d.gic
                    .icc_write(from, IccReg::Sgi1r, ((i as u64) << 24) | list as u64)
                    .unwrap();
                for pe in 0..PES {
                    if list & (1 << pe) != 0 {
                        s.sgi_pending[pe] |= 1 << i;
                    }
                }
            }
            Op::SgiAll(from, i) => {
                d.gic
                    .icc_write(from, IccReg::Sgi1r, ICC_SGI1R_IRM | ((i as u64) << 24))
                    .unwrap();
                for pe in 0..PES {
                    if pe != from {
                        s.sgi_pending[pe] |= 1 << i;
                    }
                }
            }
            Op::Ack(pe) | Op::AckFiq(pe) => {
                let fiq = matches!(op, Op::AckFiq(_));
                let line = if fiq {
                    d.gic.fiq_line(pe)
                } else {
                    d.gic.irq_line(pe)
                };
                let i = if fiq {
                    d.gic.icc_read(pe, IccReg::Iar0).unwrap() as u32
                } else {
                    d.iar(pe)
                };
                assert_eq!(line, i != INTID_SPURIOUS, "the line predicts the IAR");
                if i == INTID_SPURIOUS {
                    continue;
                }
                if i >= LPI_BASE {
                    assert!(!fiq, "LPIs are Group 1");
                    assert!(
                        s.lpi[pe].remove(&i),
                        "LPI {i} acknowledged on PE {pe} was not pending there"
                    );
                } else {
                    assert!(i < 16, "only SGIs and LPIs are in play");
                    assert_eq!(
                        fiq,
                        G0_SGIS & (1 << i) != 0,
                        "SGI {i} taken through its group's IAR"
                    );
                    assert_ne!(s.sgi_pending[pe] & (1 << i), 0, "SGI {i} was pending");
                    assert_eq!(
                        s.sgi_active[pe] & (1 << i),
                        0,
                        "SGI {i} was not already active"
                    );
                    s.sgi_pending[pe] &= !(1 << i);
                    s.sgi_active[pe] |= 1 << i;
                }
                s.stack[pe].push(i);
            }
            Op::Eoi(pe) => {
                if let Some(i) = s.stack[pe].pop() {
                    eoi(&mut d, pe, i);
                    if i < 16 {
                        s.sgi_active[pe] &= !(1 << i);
                    }
                }
            }
            Op::Pmr(pe, v) => d.gic.icc_write(pe, IccReg::Pmr, v as u64).unwrap(),
            Op::Migrate => {
                let st = d.gic.state();
                let json = serde_json::to_vec(&st).unwrap();
                let st2 = serde_json::from_slice(&json).unwrap();
                d.gic = Gic::from_state(&st2, d.gic.mem().clone()).unwrap();
            }
        }
        check_incremental_matches_full_recompute(&mut d);
        check_against_shadow(&d, &s);
    }
    // Finish every handler, unmask, and drain: exactly the shadow's pending set arrives.
    for pe in 0..PES {
        while let Some(i) = s.stack[pe].pop() {
            eoi(&mut d, pe, i);
            if i < 16 {
                s.sgi_active[pe] &= !(1 << i);
            }
        }
        d.gic.icc_write(pe, IccReg::Pmr, 0xFF).unwrap();
        let mut got: BTreeSet<u32> = BTreeSet::new();
        loop {
            let i = d.gic.icc_read(pe, IccReg::Iar0).unwrap() as u32;
            if i == INTID_SPURIOUS {
                break;
            }
            assert!(got.insert(i), "Group 0 SGI {i} delivered twice");
            d.gic.icc_write(pe, IccReg::Eoir0, i as u64).unwrap();
        }
        for i in d.drain(pe) {
            assert!(got.insert(i), "interrupt {i} delivered twice");
        }
        let mut want = s.lpi[pe].clone();
        want.extend((0..16).filter(|i| s.sgi_pending[pe] & (1 << i) != 0));
        assert_eq!(
            got, want,
            "drained exactly the pending interrupts on PE {pe}"
        );
        assert_eq!(d.gic.icc_read(pe, IccReg::Rpr).unwrap(), 0xFF);
    }
    assert_eq!(d.its_error_count(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn interrupts_are_never_lost_or_duplicated(ops in proptest::collection::vec(op(), 1..60)) {
        run_ops(&ops);
    }

    #[test]
    fn random_mmio_writes_never_panic(
        writes in proptest::collection::vec(
            (0u8..4, 0u64..0x2_0000, prop_oneof![Just(1u8), Just(2), Just(4), Just(8), Just(3)], any::<u64>()),
            1..200,
        )
    ) {
        let mut d = Driver::booted(2);
        for (frame, off, width, value) in writes {
            let base = match frame {
                0 => GICD,
                1 => 0x080A_0000,
                2 => 0x080C_0000,
                _ => GITS,
            };
            let addr = base + (off & !(width.max(1) as u64 - 1));
            let _ = d.gic.write(addr, width, value);
            let _ = d.gic.read(addr, width);
        }
        // The model is still coherent: a state round trip is exact.
        let st = d.gic.state();
        let g = Gic::from_state(&st, d.gic.mem().clone()).unwrap();
        prop_assert_eq!(g.state(), st);
    }

    #[test]
    fn accesses_anywhere_never_panic(
        accesses in proptest::collection::vec((any::<u64>(), any::<u8>(), any::<u64>()), 1..200)
    ) {
        let mut d = Driver::booted(1);
        for (addr, width, value) in accesses {
            // Bias half the addresses into the GIC's frames.
            let addr = if addr & 1 == 0 { 0x0800_0000 + (addr >> 1) % 0x10_0000 } else { addr };
            let _ = d.gic.read(addr, width);
            let _ = d.gic.write(addr, width, value);
        }
    }

    #[test]
    fn random_command_streams_never_panic(cmds in proptest::collection::vec(any::<[u64; 4]>(), 1..100)) {
        let mut d = Driver::booted(2);
        d.map_basic(2);
        for dw in cmds {
            let c = ItsCommand::decode(dw);
            // Decoding is total and re-encoding keeps the decoded fields.
            prop_assert_eq!(ItsCommand::decode(c.encode()), c);
            d.cmds(&[c]);
        }
        let st = d.gic.state();
        let g = Gic::from_state(&st, d.gic.mem().clone()).unwrap();
        prop_assert_eq!(g.state(), st);
    }

    #[test]
    fn qtest_lines_never_panic(
        lines in proptest::collection::vec(
            (
                prop_oneof![
                    Just("readb"), Just("readw"), Just("readl"), Just("readq"), Just("writel"),
                    Just("writeq"), Just("read"), Just("write"), Just("memset"), Just("gic_ack"),
                    Just("gic_eoi"), Just("gic_icc_read"), Just("gic_icc_write"), Just("gic_irq"),
                    Just("gic_msi"), Just("gic_its_errors"), Just("gic_dirty"), Just("bogus"),
                ],
                proptest::collection::vec(
                    prop_oneof![
                        any::<u64>().prop_map(|v| format!("0x{v:x}")),
                        (0u64..0x100).prop_map(|v| v.to_string()),
                        (0x0800_0000u64..0x0820_0000).prop_map(|v| format!("0x{v:x}")),
                        Just("pmr".to_string()),
                        Just("iar1".to_string()),
                        "[ -~]{0,12}",
                    ],
                    0..4,
                ),
            ),
            1..40,
        ),
        garbage in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut script = Vec::new();
        for (cmd, args) in &lines {
            script.extend_from_slice(cmd.as_bytes());
            for a in args {
                script.push(b' ');
                script.extend_from_slice(a.as_bytes());
            }
            script.push(b'\n');
        }
        script.extend_from_slice(&garbage);
        let cfg = gic::qtest::QtestConfig { ram_size: 1 << 20, ..Default::default() };
        let mut out = Vec::new();
        let summary = gic::qtest::serve(&script[..], &mut out, &cfg).unwrap();
        // One answer per non-blank line.
        let answered = String::from_utf8_lossy(&out).lines().count() as u64;
        prop_assert_eq!(answered, summary.ok + summary.failed);
    }

    #[test]
    fn fuzz_entry_point_smoke(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        gic::fuzz::run(&data);
    }
}
