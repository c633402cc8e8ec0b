//! Debug builds only: after every `update`, the fast path's cached state (per-PE candidate,
//! running SPI and LPI summaries, line levels) is compared with a from-scratch computation
//! that rescans every SGI/PPI, SPI and pending LPI, the way the model computed it before the
//! fast path. Every test in debug builds therefore also checks the fast path; release builds
//! (benchmarks) skip it.

use crate::cpuif::Group;
use crate::regs::*;
use crate::{Candidate, Gic, GuestMem};

impl<M: GuestMem> Gic<M> {
    /// Highest priority pending interrupt of `pe`, rescanning everything.
    fn reference_hppi(&self, pe: usize) -> Option<Candidate> {
        let cpu = &self.cpus[pe];
        let g0 = self.dist.ctlr & GICD_CTLR_ENABLE_G0 != 0 && cpu.group_enabled(Group::G0);
        let g1 = self.dist.ctlr & GICD_CTLR_ENABLE_G1 != 0 && cpu.group_enabled(Group::G1);
        if !g0 && !g1 {
            return None;
        }
        let enabled = |g: Group| if g == Group::G1 { g1 } else { g0 };
        let group_of = |bits: u32, i: u32| {
            if bits & (1 << i) != 0 {
                Group::G1
            } else {
                Group::G0
            }
        };
        let mut best: Option<Candidate> = None;
        let mut offer = |intid: u32, prio: u8, group: Group| {
            if enabled(group) && best.map_or(true, |b| prio < b.prio) {
                best = Some(Candidate { intid, prio, group });
            }
        };
        let rd = &self.rds[pe];
        let bits = rd.pending_word() & rd.enable & !rd.active;
        for i in (0..NUM_PRIVATE).filter(|i| bits & (1 << i) != 0) {
            offer(i, rd.priority[i as usize], group_of(rd.group, i));
        }
        let d = &self.dist;
        for w in 1..d.pending.len() {
            let bits = d.pending_word(w) & d.enable[w] & !d.active[w];
            for i in (0..32).filter(|i| bits & (1 << i) != 0) {
                let intid = w as u32 * 32 + i;
                if self.aff_to_pe.get(&d.route_affinity(intid)) == Some(&pe) {
                    offer(intid, d.priority[intid as usize], group_of(d.group[w], i));
                }
            }
        }
        if rd.enable_lpis {
            for intid in rd.lpi_pending.iter() {
                let c = rd.lpi_config(intid);
                if c & LPI_PROP_ENABLE != 0 {
                    offer(intid, c & LPI_PROP_PRIORITY_MASK & PRIORITY_MASK, Group::G1);
                }
            }
        }
        best
    }

    /// Panics (debug builds) if the fast path disagrees with a full recomputation.
    pub(crate) fn check_fast_path(&self) {
        for pe in 0..self.levels.len() {
            let want = self.reference_hppi(pe);
            assert_eq!(self.hppi_cache[pe], want, "fast-path candidate of PE {pe}");
            let line = |g: Group| {
                want.is_some_and(|c| c.group == g && self.cpus[pe].can_signal(g, c.prio))
            };
            assert_eq!(self.levels[pe], line(Group::G1), "IRQ line of PE {pe}");
            assert_eq!(self.fiq_levels[pe], line(Group::G0), "FIQ line of PE {pe}");
        }
    }
}
