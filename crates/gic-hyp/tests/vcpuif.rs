//! Emulated interrupts through list registers beside GICv4.1 direct interrupts, and the
//! save/restore of a vCPU's virtual CPU interface across a migration (IHI 0069, "Virtual
//! interrupt handling": the hypervisor saves ICH_LR<n>_EL2, ICH_VMCR_EL2 and ICH_AP*R_EL2 on
//! exit and restores them on entry, possibly on another PE).

use std::collections::BTreeMap;
use std::sync::Arc;

use gic::regs::*;
use gic::{GicConfig, IchReg, IcvReg, V41Config};
use gic_hyp::{Host, HostParams, VcpuIf, VcpuIfState, Vm, VmParams};

fn host() -> Arc<Host> {
    let mut cfg = GicConfig::virt_v41(4, 1);
    cfg.pe_affinities = vec![0x000, 0x001, 0x100, 0x101];
    cfg.v41 = Some(V41Config {
        common_lpi_aff: 3,
        svpet: 3,
        vpeid_bits: 12,
        ..V41Config::default()
    });
    let h = Arc::new(
        Host::boot(HostParams {
            gic: cfg,
            ..HostParams::default()
        })
        .expect("boot"),
    );
    // The host takes the maintenance interrupt (PPI 25) on every PE.
    for pe in 0..4 {
        let sgi = h.gic().config().rd_base(pe) + GICR_SGI_OFFSET;
        let mut g = h.gic();
        let grp = g.read(sgi + GICR_IGROUPR0, 4).unwrap();
        g.write(sgi + GICR_IGROUPR0, 4, grp | 1 << ICH_MAINTENANCE_PPI)
            .unwrap();
        g.write(sgi + GICR_ISENABLER0, 4, 1 << ICH_MAINTENANCE_PPI)
            .unwrap();
    }
    h
}

/// The guest on `pe` takes everything it can; the host services the maintenance interrupt
/// when the guest runs dry. Returns every vINTID taken, in order, and how many maintenance
/// interrupts were handled.
fn guest_run(h: &Host, vif: &mut VcpuIf, pe: usize) -> (Vec<u32>, usize) {
    let mut got = Vec::new();
    let mut maint = 0;
    for _ in 0..1000 {
        let i = {
            let mut g = h.gic();
            let i = g.icv_read(pe, IcvReg::Iar1).unwrap() as u32;
            if i != INTID_SPURIOUS {
                g.icv_write(pe, IcvReg::Eoir1, i as u64).unwrap();
            }
            i
        };
        if i != INTID_SPURIOUS {
            got.push(i);
            continue;
        }
        match h.take_irq(pe) {
            Some(ICH_MAINTENANCE_PPI) => {
                maint += 1;
                vif.maintenance(&mut h.gic()).unwrap();
            }
            Some(other) => panic!("unexpected host interrupt {other}"),
            None => break,
        }
    }
    (got, maint)
}

#[test]
fn vcpu_migration_in_the_middle_of_emulated_and_direct_interrupts_loses_nothing() {
    let h = host();
    let vm = Vm::create(
        Arc::clone(&h),
        VmParams {
            vcpus: 1,
            ..VmParams::default()
        },
    )
    .unwrap();
    // A device forwarded to vCPU 0 as direct vLPI 8300 (priority 0x40).
    h.map_device(0, 5, 3).unwrap();
    let lpi = h.alloc_lpis(1).unwrap();
    h.map_host_lpi(0, 5, 2, lpi, 0).unwrap();
    vm.map_vlpi(0, 0, 5, 2, 8300, lpi, 0, 0x40).unwrap();

    let mut vif = VcpuIf::new();
    vm.vcpu_load(0, 0, true).unwrap();
    vif.load(&mut h.gic(), 0).unwrap();
    {
        let mut g = h.gic();
        g.icv_write(0, IcvReg::Pmr, 0xFF).unwrap();
        g.icv_write(0, IcvReg::Igrpen1, 1).unwrap();
    }
    // Six emulated interrupts for four list registers: two wait in the context.
    for i in 40..46 {
        vif.inject(&mut h.gic(), i, 0x80, true).unwrap();
    }
    vif.inject(&mut h.gic(), 41, 0x80, true).unwrap(); // already pending: coalesced
    assert_eq!(
        h.gic().ich_read(0, IchReg::Elrsr).unwrap(),
        0,
        "all LRs used"
    );
    // The guest takes 40 and is still in its handler (active, priority 0x80 running) ...
    assert_eq!(h.gic().icv_read(0, IcvReg::Iar1).unwrap(), 40);
    // ... when the device fires.
    h.gic().send_msi(0, 5, 2).unwrap();

    // Migration: exit on PE 0, save, restore from the serialized form, enter on PE 2 (the
    // other cluster: VMOVP).
    assert!(
        vif.put(&mut h.gic()).unwrap(),
        "emulated interrupts still pending"
    );
    vm.vcpu_put(0, false).unwrap();
    assert_eq!(h.gic().ich_read(0, IchReg::Hcr).unwrap() & ICH_HCR_EN, 0);
    assert!(
        h.gic().icv_read(0, IcvReg::Iar1).is_err(),
        "nothing runs on PE 0"
    );
    let saved = serde_json::to_string(&vif.state().unwrap()).unwrap();
    let back: VcpuIfState = serde_json::from_str(&saved).unwrap();
    let mut vif = VcpuIf::from_state(&back).unwrap();
    vm.vcpu_load(0, 2, true).unwrap();
    vif.load(&mut h.gic(), 2).unwrap();
    assert_eq!(vif.loaded_on(), Some(2));

    // The guest resumes inside its handler: 0x80 still running, so the direct vLPI (0x40)
    // preempts while the emulated ones (0x80) wait.
    assert_eq!(h.gic().icv_read(2, IcvReg::Rpr).unwrap(), 0x80);
    assert_eq!(h.gic().icv_read(2, IcvReg::Iar1).unwrap(), 8300);
    h.gic().icv_write(2, IcvReg::Eoir1, 8300).unwrap();
    assert_eq!(
        h.gic().icv_read(2, IcvReg::Iar1).unwrap(),
        INTID_SPURIOUS as u64
    );
    h.gic().icv_write(2, IcvReg::Eoir1, 40).unwrap();
    let (got, maint) = guest_run(&h, &mut vif, 2);
    assert!(
        maint >= 1,
        "underflow maintenance refilled the list registers"
    );
    let mut all = vec![40, 8300];
    all.extend(&got);
    let mut counts = BTreeMap::new();
    for i in &all {
        *counts.entry(*i).or_insert(0) += 1;
    }
    let want: BTreeMap<u32, i32> = [40, 41, 42, 43, 44, 45, 8300]
        .into_iter()
        .map(|i| (i, 1))
        .collect();
    assert_eq!(counts, want, "every interrupt exactly once");
    assert!(!vif.pending(&h.gic()));
    assert_eq!(h.gic().ich_read(2, IchReg::Elrsr).unwrap(), 0b1111);
    assert!(!h.gic().virq_line(2));
}

#[test]
fn emulated_interrupts_injected_while_the_vcpu_is_out_wait_for_its_next_entry() {
    let h = host();
    let mut vif = VcpuIf::new();
    vif.inject(&mut h.gic(), 33, 0xA0, true).unwrap();
    assert!(vif.pending(&h.gic()));
    assert_eq!(h.gic().ich_read(1, IchReg::Lr(0)).unwrap(), 0);
    vif.load(&mut h.gic(), 1).unwrap();
    assert!(vif.load(&mut h.gic(), 1).is_err(), "already loaded");
    let mut other = VcpuIf::new();
    assert!(
        other.load(&mut h.gic(), 1).is_err(),
        "PE 1's interface is in use"
    );
    {
        let mut g = h.gic();
        g.icv_write(1, IcvReg::Pmr, 0xFF).unwrap();
        g.icv_write(1, IcvReg::Igrpen1, 1).unwrap();
    }
    let (got, _) = guest_run(&h, &mut vif, 1);
    assert_eq!(got, vec![33]);
    assert!(!vif.put(&mut h.gic()).unwrap());
    assert!(vif.state().is_ok());
    let bad = VcpuIfState {
        lrs: vec![0; 3],
        ..VcpuIfState::default()
    };
    assert!(VcpuIf::from_state(&bad).is_err());
}

mod random {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const VCPUS: usize = 3;
    const PES: usize = 2;
    const PRIOS: [u8; 3] = [0x40, 0x80, 0xA0];

    #[derive(Debug, Clone)]
    enum Op {
        Load(usize, usize),
        Put(usize),
        /// Emulated interrupt 32 + id (id < 12) with a priority from PRIOS.
        Inject(usize, u32, usize),
        /// The guest acknowledges one interrupt.
        Ack(usize),
        /// The guest completes its most recent one.
        Eoi(usize),
        /// The host services PE p's maintenance interrupt.
        Maintenance(usize),
        /// Save the context through JSON and rebuild it (while not loaded).
        SaveRestore(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (0..VCPUS, 0..PES).prop_map(|(v, p)| Op::Load(v, p)),
            2 => (0..VCPUS).prop_map(Op::Put),
            4 => (0..VCPUS, 0..12u32, 0..3usize).prop_map(|(v, i, p)| Op::Inject(v, i, p)),
            3 => (0..VCPUS).prop_map(Op::Ack),
            3 => (0..VCPUS).prop_map(Op::Eoi),
            1 => (0..PES).prop_map(Op::Maintenance),
            1 => (0..VCPUS).prop_map(Op::SaveRestore),
        ]
    }

    struct World {
        h: Arc<Host>,
        vif: Vec<VcpuIf>,
        /// Injected and not yet acknowledged.
        outstanding: Vec<BTreeSet<u32>>,
        /// Acknowledged, not yet completed (innermost last).
        stack: Vec<Vec<u32>>,
        ready: Vec<bool>,
    }

    impl World {
        fn pe_free(&self, p: usize) -> bool {
            self.vif.iter().all(|v| v.loaded_on() != Some(p))
        }

        fn ack(&mut self, v: usize) -> Result<bool, TestCaseError> {
            let Some(pe) = self.vif[v].loaded_on() else {
                return Ok(false);
            };
            let i = self.h.gic().icv_read(pe, IcvReg::Iar1).unwrap() as u32;
            if i == INTID_SPURIOUS {
                return Ok(false);
            }
            prop_assert!(self.outstanding[v].remove(&i), "vCPU {v}: {i} duplicated");
            self.stack[v].push(i);
            Ok(true)
        }

        fn eoi(&mut self, v: usize) {
            let Some(pe) = self.vif[v].loaded_on() else {
                return;
            };
            if let Some(i) = self.stack[v].pop() {
                self.h.gic().icv_write(pe, IcvReg::Eoir1, i as u64).unwrap();
            }
        }

        fn load(&mut self, v: usize, p: usize) {
            self.vif[v].load(&mut self.h.gic(), p).unwrap();
            if !self.ready[v] {
                let mut g = self.h.gic();
                g.icv_write(p, IcvReg::Pmr, 0xFF).unwrap();
                g.icv_write(p, IcvReg::Igrpen1, 1).unwrap();
                self.ready[v] = true;
            }
        }

        fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
            match op {
                Op::Load(v, p) => {
                    if self.vif[v].loaded_on().is_none() && self.pe_free(p) {
                        self.load(v, p);
                    }
                }
                Op::Put(v) => {
                    if self.vif[v].loaded_on().is_some() {
                        self.vif[v].put(&mut self.h.gic()).unwrap();
                    }
                }
                Op::Inject(v, i, p) => {
                    if self.outstanding[v].insert(32 + i) {
                        self.vif[v]
                            .inject(&mut self.h.gic(), 32 + i, PRIOS[p], true)
                            .unwrap();
                    }
                }
                Op::Ack(v) => {
                    self.ack(v)?;
                }
                Op::Eoi(v) => self.eoi(v),
                Op::Maintenance(p) => {
                    if self.h.take_irq(p) == Some(ICH_MAINTENANCE_PPI) {
                        if let Some(v) = (0..VCPUS).find(|v| self.vif[*v].loaded_on() == Some(p)) {
                            self.vif[v].maintenance(&mut self.h.gic()).unwrap();
                        }
                    }
                }
                Op::SaveRestore(v) => {
                    if self.vif[v].loaded_on().is_none() {
                        let s = serde_json::to_string(&self.vif[v].state().unwrap()).unwrap();
                        let back: VcpuIfState = serde_json::from_str(&s).unwrap();
                        self.vif[v] = VcpuIf::from_state(&back).unwrap();
                    }
                }
            }
            Ok(())
        }

        /// Runs every vCPU on PE 0 until it has taken and completed everything.
        fn finish(&mut self) -> Result<(), TestCaseError> {
            for v in 0..VCPUS {
                if self.vif[v].loaded_on().is_some() {
                    self.vif[v].put(&mut self.h.gic()).unwrap();
                }
            }
            for v in 0..VCPUS {
                self.load(v, 0);
                for _ in 0..200 {
                    if self.ack(v)? {
                        continue;
                    }
                    if !self.stack[v].is_empty() {
                        self.eoi(v);
                        continue;
                    }
                    if self.h.take_irq(0) == Some(ICH_MAINTENANCE_PPI) {
                        self.vif[v].maintenance(&mut self.h.gic()).unwrap();
                        continue;
                    }
                    break;
                }
                prop_assert!(
                    self.outstanding[v].is_empty(),
                    "vCPU {v} lost {:?}",
                    self.outstanding[v]
                );
                prop_assert!(!self.vif[v].pending(&self.h.gic()));
                self.vif[v].put(&mut self.h.gic()).unwrap();
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random injections, guest acknowledges/EOIs, maintenance, loads, puts, migrations
        /// and save/restores of the list-register context: every emulated interrupt is taken
        /// exactly once (re-injection while active included).
        #[test]
        fn list_register_contexts_deliver_every_emulated_interrupt_exactly_once(
            ops in proptest::collection::vec(op(), 1..150)
        ) {
            let mut w = World {
                h: host(),
                vif: vec![VcpuIf::new(); VCPUS],
                outstanding: vec![BTreeSet::new(); VCPUS],
                stack: vec![Vec::new(); VCPUS],
                ready: vec![false; VCPUS],
            };
            for o in ops {
                w.apply(o)?;
            }
            w.finish()?;
        }
    }
}
