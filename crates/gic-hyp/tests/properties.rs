//! Property tests over random schedules: vCPUs loaded, put (blocking or preempted),
//! migrated, IPIs (hardware vSGIs through ICC_SGI1R dispatch) and device MSIs (direct vLPIs).
//! Invariants: every interrupt is delivered exactly once, a doorbell is raised at most once
//! per non-residency phase (and exactly once when one was requested and work arrived), and
//! the model never sees a CONSTRAINED UNPREDICTABLE access.

use std::collections::BTreeSet;
use std::sync::Arc;

use gic::regs::*;
use gic::{GicConfig, IcvReg, V41Config};
use gic_hyp::sim::{self, SimMode, SimParams};
use gic_hyp::vgic::VGic;
use gic_hyp::{Host, HostParams, Vm, VmParams};
use proptest::prelude::*;

const VCPUS: usize = 4;
const PCPUS: usize = 4;
const EVENTS: u32 = 4;

#[derive(Debug, Clone)]
enum Op {
    Load(usize, usize),
    Put(usize, bool),
    Migrate(usize, usize),
    Ipi(usize, u8),
    Msi(usize, u32),
    Take,
    HostIrqs,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..VCPUS, 0..PCPUS).prop_map(|(v, p)| Op::Load(v, p)),
        3 => (0..VCPUS, any::<bool>()).prop_map(|(v, b)| Op::Put(v, b)),
        1 => (0..VCPUS, 0..PCPUS).prop_map(|(v, p)| Op::Migrate(v, p)),
        3 => (0..VCPUS, 0..4u8).prop_map(|(v, s)| Op::Ipi(v, s)),
        3 => (0..VCPUS, 0..EVENTS).prop_map(|(v, e)| Op::Msi(v, e)),
        2 => Just(Op::Take),
        2 => Just(Op::HostIrqs),
    ]
}

struct World {
    h: Arc<Host>,
    g: VGic,
    loaded: Vec<Option<usize>>,
    /// Phase of each vCPU: Some(requested) while non-resident after a put.
    phase_db_requested: Vec<bool>,
    phase_work_arrived: Vec<bool>,
    phase_doorbells: Vec<u32>,
    outstanding: Vec<BTreeSet<u32>>,
    icv_ready: Vec<bool>,
}

impl World {
    fn new() -> World {
        let mut cfg = GicConfig::virt_v41(PCPUS, 1);
        cfg.pe_affinities = vec![0x000, 0x001, 0x100, 0x101];
        cfg.v41 = Some(V41Config {
            common_lpi_aff: 3,
            svpet: 3,
            vpeid_bits: 8,
            ..V41Config::default()
        });
        let h = Arc::new(
            Host::boot(HostParams {
                gic: cfg,
                ram_size: 8 << 20,
                ..HostParams::default()
            })
            .unwrap(),
        );
        let vm = Vm::create(
            Arc::clone(&h),
            VmParams {
                vcpus: VCPUS,
                ..VmParams::default()
            },
        )
        .unwrap();
        let lpis = h.alloc_lpis(VCPUS as u32 * EVENTS).unwrap();
        for v in 0..VCPUS {
            h.map_device(0, v as u32 + 1, 2).unwrap();
            for e in 0..EVENTS {
                let lpi = lpis + v as u32 * EVENTS + e;
                h.map_host_lpi(0, v as u32 + 1, e, lpi, 0).unwrap();
                vm.map_vlpi(v, 0, v as u32 + 1, e, 8192 + e, lpi, 0, 0x40)
                    .unwrap();
            }
        }
        let g = VGic::new(vm, true);
        for v in 0..VCPUS {
            g.sgi_write(v, GICR_IGROUPR0, 0xFFFF).unwrap();
            g.sgi_write(v, GICR_ISENABLER0, 0xFFFF).unwrap();
        }
        g.gicd_write_ctlr(GICD_CTLR_ENABLE_G1 | GICD_CTLR_NASSGIREQ)
            .unwrap();
        World {
            h,
            g,
            loaded: vec![None; VCPUS],
            // A vPE that has never been resident has its default doorbell armed (B0).
            phase_db_requested: vec![true; VCPUS],
            phase_work_arrived: vec![false; VCPUS],
            phase_doorbells: vec![0; VCPUS],
            outstanding: vec![BTreeSet::new(); VCPUS],
            icv_ready: vec![false; VCPUS],
        }
    }

    fn pcpu_free(&self, p: usize) -> bool {
        !self.loaded.contains(&Some(p))
    }

    fn arrived(&mut self, v: usize) {
        if self.loaded[v].is_none() {
            self.phase_work_arrived[v] = true;
        }
    }

    fn load(&mut self, v: usize, p: usize) -> Result<(), TestCaseError> {
        // The phase ends: at most one doorbell, exactly one if requested and work came.
        prop_assert!(
            self.phase_doorbells[v] <= 1,
            "vCPU {v}: {} doorbells",
            self.phase_doorbells[v]
        );
        if self.phase_db_requested[v] && self.phase_work_arrived[v] {
            self.host_irqs();
            prop_assert_eq!(self.phase_doorbells[v], 1, "vCPU {} missed its doorbell", v);
        }
        self.g.vcpu_load(v, p).unwrap();
        self.loaded[v] = Some(p);
        self.phase_db_requested[v] = false;
        self.phase_work_arrived[v] = false;
        self.phase_doorbells[v] = 0;
        if !self.icv_ready[v] {
            let mut gic = self.h.gic();
            gic.icv_write(p, IcvReg::Pmr, 0xFF).unwrap();
            gic.icv_write(p, IcvReg::Igrpen1, 1).unwrap();
            self.icv_ready[v] = true;
        }
        Ok(())
    }

    fn take(&mut self) -> Result<(), TestCaseError> {
        for v in 0..VCPUS {
            let Some(p) = self.loaded[v] else { continue };
            loop {
                let i = {
                    let mut gic = self.h.gic();
                    let i = gic.icv_read(p, IcvReg::Iar1).unwrap() as u32;
                    if i != INTID_SPURIOUS {
                        gic.icv_write(p, IcvReg::Eoir1, i as u64).unwrap();
                    }
                    i
                };
                if i == INTID_SPURIOUS {
                    break;
                }
                prop_assert!(self.outstanding[v].remove(&i), "vCPU {v}: duplicate {i}");
            }
        }
        Ok(())
    }

    fn host_irqs(&mut self) {
        for p in 0..PCPUS {
            while let Some(lpi) = self.h.take_irq(p) {
                if let Some(v) = self.g.vm().handle_doorbell(lpi) {
                    self.phase_doorbells[v] += 1;
                }
            }
        }
    }

    fn apply(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Load(v, p) => {
                if self.loaded[v].is_none() && self.pcpu_free(p) {
                    self.load(v, p)?;
                }
            }
            Op::Put(v, blocking) => {
                if self.loaded[v].is_some() {
                    let pending_last = self.g.vcpu_put(v, blocking).unwrap();
                    self.loaded[v] = None;
                    self.phase_db_requested[v] = blocking && !pending_last;
                }
            }
            Op::Migrate(v, p) => {
                if self.loaded[v].is_none() {
                    self.g.vm().set_affinity(v, p).unwrap();
                }
            }
            Op::Ipi(v, sgi) => {
                if self.outstanding[v].insert(sgi as u32) {
                    let from = (v + 1) % VCPUS;
                    let val = ((sgi as u64) << ICC_SGI1R_INTID_SHIFT) | (1 << v);
                    let sw = self.g.dispatch_sgi1r(from, val).unwrap();
                    prop_assert!(sw.is_empty());
                    self.arrived(v);
                }
            }
            Op::Msi(v, e) => {
                if self.outstanding[v].insert(8192 + e) {
                    self.h.gic().send_msi(0, v as u32 + 1, e).unwrap();
                    self.arrived(v);
                }
            }
            Op::Take => self.take()?,
            Op::HostIrqs => self.host_irqs(),
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), TestCaseError> {
        self.host_irqs();
        for v in 0..VCPUS {
            if self.loaded[v].is_some() {
                self.g.vcpu_put(v, false).unwrap();
                self.loaded[v] = None;
            }
        }
        for v in 0..VCPUS {
            self.load(v, 0)?;
            self.take()?;
            self.g.vcpu_put(v, false).unwrap();
            self.loaded[v] = None;
        }
        for (v, o) in self.outstanding.iter().enumerate() {
            prop_assert!(o.is_empty(), "vCPU {v} lost {o:?}");
        }
        prop_assert_eq!(self.h.gic().unpredictable_events().1, 0);
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_schedules_deliver_every_interrupt_once_with_at_most_one_doorbell_per_phase(
        ops in proptest::collection::vec(op(), 1..120)
    ) {
        let mut w = World::new();
        for o in ops {
            w.apply(o)?;
        }
        w.finish()?;
    }

    #[test]
    fn random_simulations_pass_their_checks_in_every_mode(
        seed in any::<u64>(),
        vcpus in 1usize..7,
        pcpus in 1usize..4,
        ipi in 0.0f64..0.2,
        msi in 0.0f64..0.05,
        wfi in 0.0f64..0.3,
    ) {
        let p = SimParams {
            vcpus,
            pcpus,
            clusters: pcpus.min(2),
            ticks: 400,
            slice: 7,
            ipi_prob: ipi,
            msi_prob: msi,
            wfi_prob: wfi,
            events: 4,
            seed,
            modes: vec![SimMode::V3, SimMode::V40, SimMode::V41],
        };
        let r = sim::run(&p).unwrap();
        for m in &r.modes {
            prop_assert!(m.ok(), "{:?}", m);
        }
        let v41 = &r.modes[2];
        prop_assert!(v41.max_doorbells_per_phase <= 1);
    }
}
