//! The driver's sequences for each patch of the GICv4.1 series (and the KVM side), run
//! against the model. Each test names the patch or fix whose behaviour it checks.

use std::sync::Arc;

use gic::regs::*;
use gic::{GicConfig, IcvReg, UnpredictableEvent, V41Config};
use gic_hyp::vgic::VGic;
use gic_hyp::vm::{DoorbellStyle, SgiConfig};
use gic_hyp::{Host, HostParams, HypError, Vm, VmParams};

/// 4 PEs in two clusters ({0,1}, {2,3}) whose redistributors share a vPE table per cluster,
/// `its` ITSs sharing theirs with cluster 0.
fn host(its: usize) -> Arc<Host> {
    let mut cfg = GicConfig::virt_v41(4, its);
    cfg.pe_affinities = vec![0x000, 0x001, 0x100, 0x101];
    cfg.v41 = Some(V41Config {
        common_lpi_aff: 3,
        svpet: 3,
        vpeid_bits: 12,
        busy_reads: 2,
        ..V41Config::default()
    });
    Arc::new(
        Host::boot(HostParams {
            gic: cfg,
            ..HostParams::default()
        })
        .expect("boot"),
    )
}

fn vm(h: &Arc<Host>, vcpus: usize) -> Vm {
    Vm::create(
        Arc::clone(h),
        VmParams {
            vcpus,
            ..VmParams::default()
        },
    )
    .expect("vm")
}

fn guest_ready(h: &Host, pe: usize) {
    let mut g = h.gic();
    g.icv_write(pe, IcvReg::Pmr, 0xFF).unwrap();
    g.icv_write(pe, IcvReg::Igrpen1, 1).unwrap();
}

fn guest_drain(h: &Host, pe: usize) -> Vec<u32> {
    let mut g = h.gic();
    let mut out = Vec::new();
    loop {
        let i = g.icv_read(pe, IcvReg::Iar1).unwrap() as u32;
        if i == INTID_SPURIOUS {
            return out;
        }
        g.icv_write(pe, IcvReg::Eoir1, i as u64).unwrap();
        out.push(i);
    }
}

fn unpredictable(h: &Host) -> Vec<UnpredictableEvent> {
    h.gic().unpredictable_events().0
}

#[test]
fn boot_probes_v41_and_shares_vpe_tables_by_commonlpiaff_and_svpet() {
    let h = host(2);
    let i = h.info();
    assert!(i.v41 && i.vsgi && i.dirty && i.vmovp);
    assert_eq!(i.vpeid_bits, 12);
    assert_eq!(i.rd_group, vec![0, 0, 0x100, 0x100]);
    assert_eq!(i.its_table, vec![0, 0], "SVPET siblings share one table");
    assert_eq!(
        i.rd_table,
        vec![0, 0, 1, 1],
        "cluster 0 inherits the ITS table"
    );
    assert!(h.share_vpe_table(0, 1) && !h.share_vpe_table(1, 2));
    let its_b2 = h.read(i.its_base[1] + GITS_BASER + 16, 8).unwrap() & GITS_BASER_PA_MASK;
    let rd_vp = h.read(h.vlpi(1).unwrap() + GICR_VPROPBASER, 8).unwrap() & VPROPBASER_PA_MASK;
    assert_eq!(its_b2, rd_vp);
    // A GICv3-only GIC is refused.
    let v3 = Arc::new(
        Host::boot(HostParams {
            gic: GicConfig::virt(2),
            ..HostParams::default()
        })
        .unwrap(),
    );
    assert!(!v3.info().v41);
    assert_eq!(
        Vm::create(v3, VmParams::default()).unwrap_err(),
        HypError::NotV41
    );
}

#[test]
fn vm_creation_maps_every_vpe_on_every_its_so_vsgis_always_work() {
    // "Map all vPEs at activation" / May-2020 fix: v4 context for every VM on v4.1.
    let h = host(2);
    let vm = vm(&h, 3);
    for v in 0..3 {
        let id = vm.vpeid(v).unwrap();
        let g = h.gic();
        let vpe = g.vpe(id).expect("allocated");
        assert_eq!(vpe.its_mapped, 0b11, "mapped on both ITSs");
        assert_eq!(
            vpe.sgi_enable, 0,
            "vSGIs activated disabled, priority 0, group 0"
        );
    }
    assert!(unpredictable(&h).is_empty());
    assert_eq!(h.gic().its_errors(0).unwrap().1, 0);
    assert_eq!(h.gic().its_errors(1).unwrap().1, 0);
    vm.destroy().unwrap();
    assert!(
        h.gic().vpe(0).is_none(),
        "VMAPP V=0 with Alloc on the last ITS frees it"
    );
}

#[test]
fn doorbells_are_auto_enabled_and_fire_once_when_the_vcpu_blocks() {
    // "irqchip/gic-v4.1: Let doorbells be auto-enabled": nothing enables the doorbell LPI
    // around blocking; VPENDBASER.DB decides.
    let h = host(1);
    let vm = vm(&h, 2);
    let db = vm.doorbell(1).unwrap();
    let mut cfg = [0u8];
    let prop = {
        let g = h.gic();
        g.read(h.rd(0).unwrap() + GICR_PROPBASER, 8).unwrap() & GICR_PROPBASER_PA_MASK
    };
    h.mem_read(prop + (db - LPI_BASE) as u64, &mut cfg).unwrap();
    assert_ne!(
        cfg[0] & LPI_PROP_ENABLE,
        0,
        "doorbell enabled from allocation"
    );
    vm.vsgi_configure(
        1,
        3,
        SgiConfig {
            enabled: true,
            group1: true,
            priority: 0x80,
        },
    )
    .unwrap();
    vm.vcpu_load(1, 0, true).unwrap();
    // Preempted (not blocking): no doorbell.
    assert!(vm.vcpu_put(1, false).unwrap(), "we'll be back");
    vm.vsgi_set_pending(1, 3).unwrap();
    assert_eq!(h.take_irq(0), None);
    vm.vcpu_load(1, 0, true).unwrap();
    guest_ready(&h, 0);
    assert_eq!(guest_drain(&h, 0), vec![3]);
    // Blocking in WFI: doorbell requested, fires once, wakes the vCPU.
    assert!(!vm.vcpu_put(1, true).unwrap());
    assert!(!vm.vcpu_pending(1).unwrap());
    vm.vsgi_set_pending(1, 3).unwrap();
    vm.vsgi_set_pending(1, 4).unwrap();
    let taken = h.take_irq(0);
    assert_eq!(taken, Some(db));
    assert_eq!(vm.handle_doorbell(db), Some(1));
    assert!(
        vm.vcpu_pending(1).unwrap(),
        "doorbell marks the vCPU runnable"
    );
    assert_eq!(h.take_irq(0), None, "at most once per non-residency phase");
    assert_eq!(vm.handle_doorbell(db + 10), None, "not this VM's doorbell");
}

#[test]
fn commit_vpe_polls_dirty_but_delivery_does_not_wait_for_the_poll() {
    // COMMIT_VPE: poll VPENDBASER.Dirty after making the vPE resident. Dirty only reports the
    // VPT parse; interrupts reach the vPE whether or not anyone polls (B2).
    let h = host(1);
    let vm = vm(&h, 1);
    vm.vsgi_configure(
        0,
        1,
        SgiConfig {
            enabled: true,
            group1: true,
            priority: 0,
        },
    )
    .unwrap();
    vm.vsgi_set_pending(0, 1).unwrap();
    vm.vcpu_load_no_commit(0, 0, true).unwrap();
    guest_ready(&h, 0);
    assert!(h.gic().virq_line(0), "no Dirty poll needed (B2)");
    vm.vcpu_commit(0).unwrap();
    assert!(h.gic().virq_line(0));
    assert_eq!(
        vm.vcpu_load(0, 0, true).unwrap_err(),
        HypError::Invalid("vCPU already loaded")
    );
}

#[test]
fn affinity_change_skips_vmovp_inside_a_commonlpiaff_group() {
    // "Skip VMOVP when the RDs share the vPE table".
    let h = host(1);
    let vm = vm(&h, 1);
    assert_eq!(vm.col_idx(0).unwrap(), 0);
    assert!(!vm.set_affinity(0, 1).unwrap(), "same cluster: no VMOVP");
    assert_eq!(h.gic().v41_stats().unwrap().vmovps, 0);
    assert!(vm.set_affinity(0, 2).unwrap(), "other cluster: VMOVP");
    assert_eq!(h.gic().v41_stats().unwrap().vmovps, 1);
    assert_eq!(h.gic().vpe(vm.vpeid(0).unwrap()).unwrap().rd, 2);
    assert!(!vm.set_affinity(0, 2).unwrap(), "already there");
    // Loading on the new pCPU works without unpredictable residency.
    vm.vcpu_load(0, 3, true).unwrap();
    assert!(unpredictable(&h).is_empty());
    assert_eq!(vm.set_affinity(0, 9).unwrap_err(), HypError::NoSuchPcpu(9));
}

#[test]
fn vmovp_without_the_vmovp_feature_goes_to_every_its_with_an_itslist() {
    let mut cfg = GicConfig::virt_v41(4, 2);
    cfg.pe_affinities = vec![0x000, 0x001, 0x100, 0x101];
    cfg.v41 = Some(V41Config {
        common_lpi_aff: 3,
        svpet: 3,
        vmovp: false,
        vpeid_bits: 8,
        ..V41Config::default()
    });
    let h = Arc::new(
        Host::boot(HostParams {
            gic: cfg,
            ..HostParams::default()
        })
        .unwrap(),
    );
    assert!(!h.info().vmovp);
    assert_eq!(h.info().its_number, vec![0, 1]);
    let vm = vm(&h, 1);
    assert!(vm.set_affinity(0, 3).unwrap());
    assert_eq!(h.gic().v41_stats().unwrap().vmovps, 2, "one per ITS");
    assert_eq!(h.gic().its_errors(0).unwrap().1, 0);
    assert_eq!(h.gic().its_errors(1).unwrap().1, 0);
}

#[test]
fn vpe_lock_and_rd_lock_keep_rd_accesses_away_from_affinity_changes() {
    // f3a059219bc7 "Ensure mutual exclusion between vPE affinity change and RD access" and
    // 9058a4e98064 "Ensure mutual exclusion between invalidations on the same RD": with
    // vSGIPENDR reads, INVLPIR/INVALLR and VMOVPs from several threads, the GIC never sees
    // a CONSTRAINED UNPREDICTABLE access.
    let h = host(1);
    let vm = Arc::new(vm(&h, 2));
    vm.map_vlpi(0, 0, 1, 0, 8200, 0, 0, 0x40).unwrap_err(); // no device mapped yet
    h.map_device(0, 1, 2).unwrap();
    let lpi = h.alloc_lpis(1).unwrap();
    h.map_host_lpi(0, 1, 0, lpi, 0).unwrap();
    vm.map_vlpi(0, 0, 1, 0, 8200, lpi, 0, 0x40).unwrap();
    let mut threads = Vec::new();
    for t in 0..3 {
        let vm = Arc::clone(&vm);
        threads.push(std::thread::spawn(move || {
            for i in 0..150 {
                match t {
                    0 => {
                        vm.set_affinity(0, [0, 2, 1, 3][i % 4]).unwrap();
                    }
                    1 => {
                        vm.vsgi_pending(0).unwrap();
                        vm.invall(0).unwrap();
                    }
                    _ => {
                        vm.set_vlpi_config(0, 8200, i % 2 == 0, 0x40).unwrap();
                        vm.vsgi_pending(1).unwrap();
                    }
                }
            }
        }));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(unpredictable(&h), vec![]);
    assert!(h.gic().v41_stats().unwrap().vmovps > 0);
}

#[test]
fn invall_waits_for_syncr_so_back_to_back_invalidations_are_safe() {
    // b978c25f6ee7 "Wait for completion of redistributor's INVALL operation".
    let h = host(1);
    let vm = vm(&h, 1);
    for _ in 0..10 {
        vm.invall(0).unwrap();
    }
    assert!(unpredictable(&h).is_empty());
    // Without the wait the second write hits a busy SYNCR.
    let rd = h.rd(0).unwrap();
    let id = vm.vpeid(0).unwrap() as u64;
    h.write(rd + GICR_INVALLR, 8, GICR_INV_V | (id << 32))
        .unwrap();
    h.write(rd + GICR_INVALLR, 8, GICR_INV_V | (id << 32))
        .unwrap();
    assert_eq!(
        unpredictable(&h),
        vec![UnpredictableEvent::InvalidateWhileBusy {
            rd: 0,
            vpeid: id as u32
        }]
    );
}

#[test]
fn vlpi_map_retarget_and_unmap_back_to_a_host_lpi() {
    let h = host(1);
    let vm = vm(&h, 2);
    h.map_device(0, 5, 3).unwrap();
    let lpi = h.alloc_lpis(1).unwrap();
    h.map_host_lpi(0, 5, 2, lpi, 1).unwrap();
    h.gic().send_msi(0, 5, 2).unwrap();
    assert_eq!(h.take_irq(1), Some(lpi), "host owns the event");
    vm.map_vlpi(0, 0, 5, 2, 8300, lpi, 1, 0x40).unwrap();
    assert_eq!(vm.vlpi_count(0), 1);
    vm.vcpu_load(0, 0, true).unwrap();
    guest_ready(&h, 0);
    h.gic().send_msi(0, 5, 2).unwrap();
    assert_eq!(guest_drain(&h, 0), vec![8300], "direct vLPI");
    // Re-target to vCPU 1 (VMOVI), which is not resident: pending in its VPT.
    vm.map_vlpi(1, 0, 5, 2, 8300, lpi, 1, 0x40).unwrap();
    h.gic().send_msi(0, 5, 2).unwrap();
    assert!(guest_drain(&h, 0).is_empty());
    // vCPU 1 has never run: its default doorbell rings (IHI 0069 default doorbells; B0).
    let db1 = vm.doorbell(1).unwrap();
    assert_eq!(h.take_irq(1), Some(db1));
    assert_eq!(vm.handle_doorbell(db1), Some(1));
    vm.vcpu_put(0, false).unwrap();
    vm.vcpu_load(1, 0, true).unwrap();
    guest_ready(&h, 0);
    assert_eq!(guest_drain(&h, 0), vec![8300]);
    // Disable through INVLPIR (register-based on v4.1).
    vm.set_vlpi_config(1, 8300, false, 0x40).unwrap();
    h.gic().send_msi(0, 5, 2).unwrap();
    assert!(guest_drain(&h, 0).is_empty());
    vm.set_vlpi_config(1, 8300, true, 0x40).unwrap();
    assert_eq!(guest_drain(&h, 0), vec![8300]);
    vm.unmap_vlpi(0, 5, 2).unwrap();
    h.gic().send_msi(0, 5, 2).unwrap();
    assert_eq!(h.take_irq(1), Some(lpi), "back to the host LPI");
    assert!(guest_drain(&h, 0).is_empty());
    assert_eq!(
        vm.unmap_vlpi(0, 5, 2).unwrap_err(),
        HypError::Invalid("event is not forwarded")
    );
    assert_eq!(
        vm.set_vlpi_config(0, 100, true, 0).unwrap_err(),
        HypError::Invalid("vINTID out of range")
    );
}

#[test]
fn gicv40_style_per_vlpi_doorbells_fire_for_every_vlpi() {
    let h = host(1);
    let vm = Vm::create(
        Arc::clone(&h),
        VmParams {
            vcpus: 1,
            doorbells: DoorbellStyle::PerVlpi,
            ..VmParams::default()
        },
    )
    .unwrap();
    h.map_device(0, 2, 2).unwrap();
    let lpis = h.alloc_lpis(2).unwrap();
    for e in 0..2 {
        h.map_host_lpi(0, 2, e, lpis + e, 0).unwrap();
        vm.map_vlpi(0, 0, 2, e, 8200 + e, lpis + e, 0, 0x40)
            .unwrap();
    }
    vm.vcpu_load(0, 0, true).unwrap();
    assert!(!vm.vcpu_put(0, true).unwrap(), "no DB requested");
    let db = vm.doorbell(0).unwrap();
    h.gic().send_msi(0, 2, 0).unwrap();
    assert_eq!(h.take_irq(0), Some(db));
    h.gic().send_msi(0, 2, 1).unwrap();
    assert_eq!(h.take_irq(0), Some(db), "again in the same phase");
    let g = h.gic();
    let vpe = g.vpe(vm.vpeid(0).unwrap()).unwrap();
    assert_eq!((vpe.doorbells, vpe.individual_doorbells), (0, 2));
}

fn vgic(h: &Arc<Host>, vcpus: usize) -> VGic {
    VGic::new(vm(h, vcpus), true)
}

#[test]
fn nassgireq_is_guest_visible_and_only_writable_while_the_distributor_is_disabled() {
    let h = host(1);
    let g = vgic(&h, 2);
    assert_eq!(g.gicd_read(GICD_TYPER2), GICD_TYPER2_NASSGICAP);
    g.gicd_write_ctlr(GICD_CTLR_ENABLE_G1).unwrap();
    let e = g
        .gicd_write_ctlr(GICD_CTLR_ENABLE_G1 | GICD_CTLR_NASSGIREQ)
        .unwrap();
    assert!(!e.switched && !g.nassgireq(), "read-only while enabled");
    let e = g.gicd_write_ctlr(GICD_CTLR_NASSGIREQ).unwrap();
    assert!(e.switched && g.nassgireq(), "writable while being disabled");
    assert_eq!(
        g.gicd_read(GICD_CTLR) & GICD_CTLR_NASSGIREQ,
        GICD_CTLR_NASSGIREQ
    );
    // "Disable vSGI upon (GIC CPUIF < v4.1) detection".
    let old_cpuif = VGic::new(vm(&h, 1), false);
    assert_eq!(old_cpuif.gicd_read(GICD_TYPER2), 0);
    old_cpuif.gicd_write_ctlr(GICD_CTLR_NASSGIREQ).unwrap();
    assert!(!old_cpuif.nassgireq());
}

#[test]
fn switching_sgis_between_software_and_hardware_preserves_their_state() {
    // vgic_v4_configure_vsgis in both directions.
    let h = host(1);
    let g = vgic(&h, 2);
    g.sgi_write(1, GICR_ISENABLER0, 0b0110).unwrap();
    g.sgi_write(1, GICR_IGROUPR0, 0b0100).unwrap();
    g.sgi_write(1, GICR_IPRIORITYR, 0x00A0_5000).unwrap();
    g.sgi_write(1, GICR_ISPENDR0, 0b0100).unwrap();
    let before = g.debug_sgis(1).unwrap();
    g.gicd_write_ctlr(GICD_CTLR_NASSGIREQ).unwrap();
    let hw = g.debug_sgis(1).unwrap();
    assert!(hw.iter().all(|s| s.hw));
    for (a, b) in before.iter().zip(&hw) {
        assert_eq!(
            (a.enabled, a.group1, a.priority, a.pending),
            (b.enabled, b.group1, b.priority, b.pending),
            "SGI {}",
            a.intid
        );
    }
    let vpe = h.gic().vpe(g.vm().vpeid(1).unwrap()).unwrap().clone();
    assert_eq!(vpe.sgi_enable, 0b0110);
    assert_eq!(vpe.sgi_group, 0b0100);
    assert_eq!(vpe.sgi_pending, 0b0100);
    assert_eq!(vpe.sgi_priority[2], 0xA0);
    assert_eq!(vpe.sgi_priority[1], 0x50);
    // Pending set in hardware comes back into the software latch.
    g.sgi_write(1, GICR_ISPENDR0, 0b0010).unwrap();
    g.gicd_write_ctlr(0).unwrap();
    let sw = g.debug_sgis(1).unwrap();
    assert!(sw.iter().all(|s| !s.hw));
    assert!(sw[1].pending && sw[2].pending && !sw[3].pending);
    assert_eq!(
        h.gic().vpe(g.vm().vpeid(1).unwrap()).unwrap().sgi_pending,
        0
    );
    assert_eq!(g.sw_pending(1), 0b0110);
}

#[test]
fn guest_sgi_register_accesses_route_to_hardware_for_hw_sgis() {
    // "Add direct injection capability to SGI registers".
    let h = host(1);
    let g = vgic(&h, 2);
    g.gicd_write_ctlr(GICD_CTLR_ENABLE_G1 | GICD_CTLR_NASSGIREQ)
        .unwrap();
    let id = g.vm().vpeid(0).unwrap();
    g.sgi_write(0, GICR_ISENABLER0, 0xFFFF).unwrap();
    g.sgi_write(0, GICR_ICENABLER0, 0x8000).unwrap();
    assert_eq!(h.gic().vpe(id).unwrap().sgi_enable, 0x7FFF);
    g.sgi_write(0, GICR_ISPENDR0, 0x0003).unwrap();
    assert_eq!(
        g.sgi_read(0, GICR_ISPENDR0).unwrap(),
        0x0003,
        "via VSGIPENDR"
    );
    g.sgi_write(0, GICR_ICPENDR0, 0x0001).unwrap();
    assert_eq!(h.gic().vpe(id).unwrap().sgi_pending, 0x0002);
    // Active state is not tracked for HW SGIs.
    g.sgi_write(0, GICR_ISACTIVER0, 0xFFFF).unwrap();
    assert_eq!(g.sgi_read(0, GICR_ISACTIVER0).unwrap(), 0);
    assert_eq!(
        g.sgi_write(5, GICR_ISPENDR0, 1).unwrap_err(),
        HypError::NoSuchVcpu(5)
    );
}

#[test]
fn guest_ipi_through_icc_sgi1r_is_a_gits_sgir_write_delivered_without_a_trap_at_the_target() {
    let h = host(1);
    let g = vgic(&h, 3);
    for v in 0..3 {
        g.sgi_write(v, GICR_IGROUPR0, 0xFFFF).unwrap();
        g.sgi_write(v, GICR_ISENABLER0, 0xFFFF).unwrap();
    }
    g.gicd_write_ctlr(GICD_CTLR_ENABLE_G1 | GICD_CTLR_NASSGIREQ)
        .unwrap();
    g.vcpu_load(2, 3).unwrap();
    guest_ready(&h, 3);
    // vCPU 0 sends SGI 5 to vCPU 2 (Aff0 = 2).
    let sw = g
        .dispatch_sgi1r(0, (5 << ICC_SGI1R_INTID_SHIFT) | 0b100)
        .unwrap();
    assert!(sw.is_empty(), "no software injection needed");
    assert!(h.gic().virq_line(3));
    assert!(!h.gic().irq_line(3), "no physical interrupt at the target");
    assert_eq!(guest_drain(&h, 3), vec![5]);
    // Broadcast (IRM) reaches the others; the non-resident one keeps it pending.
    g.dispatch_sgi1r(2, (6 << ICC_SGI1R_INTID_SHIFT) | ICC_SGI1R_IRM)
        .unwrap();
    assert_eq!(g.vm().vsgi_pending(0).unwrap(), 1 << 6);
    assert_eq!(g.vm().vsgi_pending(1).unwrap(), 1 << 6);
    assert!(guest_drain(&h, 3).is_empty(), "not to the sender");
    // Software SGIs (before nASSGIreq) come back as injection targets.
    let g2 = vgic(&h, 2);
    g2.sgi_write(1, GICR_ISENABLER0, 0xFFFF).unwrap();
    assert_eq!(
        g2.dispatch_sgi1r(0, (1 << ICC_SGI1R_INTID_SHIFT) | 0b10)
            .unwrap(),
        vec![1]
    );
    assert_eq!(g2.sw_ack(1), Some(1));
    assert_eq!(g2.sw_ack(1), None);
}

#[test]
fn wfi_does_not_trap_with_hw_sgis_or_vlpis_on_a_single_task_pcpu() {
    // "KVM: arm64: GICv4.1: Allow non-trapping WFI when using HW SGIs".
    let h = host(1);
    let g = vgic(&h, 2);
    assert!(g.wfi_traps(0, true), "nothing direct yet");
    g.gicd_write_ctlr(GICD_CTLR_NASSGIREQ).unwrap();
    assert!(!g.wfi_traps(0, true));
    assert!(g.wfi_traps(0, false), "overcommitted pCPU still traps");
    let g2 = vgic(&h, 1);
    h.map_device(0, 9, 1).unwrap();
    let lpi = h.alloc_lpis(1).unwrap();
    h.map_host_lpi(0, 9, 0, lpi, 0).unwrap();
    g2.vm().map_vlpi(0, 0, 9, 0, 8192, lpi, 0, 0x40).unwrap();
    assert!(!g2.wfi_traps(0, true), "vLPIs alone also clear TWI");
}

#[test]
fn distributor_enable_toggle_reloads_residency_so_vgrp1en_follows() {
    // d9c3872cd2f8 "Reload VLPI configuration on distributor enable/disable".
    let h = host(1);
    let g = vgic(&h, 2);
    g.vcpu_load(0, 1).unwrap();
    let a = h.vlpi(1).unwrap() + GICR_VPENDBASER;
    assert_eq!(h.read(a, 8).unwrap() & VPENDBASER_VGRP1EN, 0);
    let e = g.gicd_write_ctlr(GICD_CTLR_ENABLE_G1).unwrap();
    assert_eq!(e.reloaded, 1);
    assert_ne!(h.read(a, 8).unwrap() & VPENDBASER_VGRP1EN, 0);
    let e = g.gicd_write_ctlr(0).unwrap();
    assert_eq!(e.reloaded, 1);
    assert_eq!(h.read(a, 8).unwrap() & VPENDBASER_VGRP1EN, 0);
    assert!(unpredictable(&h).is_empty());
}

#[test]
fn debug_view_reports_hw_sgi_pending_state_from_vsgipendr() {
    // dab4fe3bf6dd "Expose HW-based SGIs in debugfs".
    let h = host(1);
    let g = vgic(&h, 1);
    g.gicd_write_ctlr(GICD_CTLR_NASSGIREQ).unwrap();
    g.vm().vsgi_set_pending(0, 9).unwrap();
    let d = g.debug_sgis(0).unwrap();
    assert!(d[9].hw && d[9].pending);
    assert!(d.iter().filter(|s| s.pending).count() == 1);
}

#[test]
fn save_restore_reapplies_nassgireq_on_first_run() {
    let h = host(1);
    let g = vgic(&h, 2);
    g.sgi_write(1, GICR_ISENABLER0, 0x00F0).unwrap();
    g.gicd_write_ctlr(GICD_CTLR_ENABLE_G1 | GICD_CTLR_NASSGIREQ)
        .unwrap_or_default();
    g.gicd_write_ctlr(0).unwrap();
    g.gicd_write_ctlr(GICD_CTLR_NASSGIREQ).unwrap();
    g.gicd_write_ctlr(GICD_CTLR_NASSGIREQ | GICD_CTLR_ENABLE_G1)
        .unwrap();
    g.vm().vsgi_set_pending(1, 4).unwrap();
    let st = g.save().unwrap();
    assert!(st.nassgireq && st.sgis[1][4].pending_latch);
    let json = serde_json::to_string(&st).unwrap();
    let back: gic_hyp::VgicState = serde_json::from_str(&json).unwrap();
    // Destination: a fresh VM on the same host.
    let dst = vgic(&h, 2);
    dst.restore(&back).unwrap();
    assert!(dst.nassgireq());
    assert!(dst.debug_sgis(1).unwrap().iter().all(|s| !s.hw), "not yet");
    dst.first_run().unwrap();
    let d = dst.debug_sgis(1).unwrap();
    assert!(d.iter().all(|s| s.hw));
    assert!(d[4].pending && d[4].enabled && !d[3].enabled);
    let id = dst.vm().vpeid(1).unwrap();
    assert_eq!(h.gic().vpe(id).unwrap().sgi_pending, 1 << 4);
    // Shape errors are typed.
    let mut bad = back.clone();
    bad.sgis.pop();
    assert!(dst.restore(&bad).is_err());
}

#[test]
fn driver_errors_are_typed_not_panics() {
    let h = host(1);
    let vm = vm(&h, 1);
    assert_eq!(vm.vpeid(3).unwrap_err(), HypError::NoSuchVcpu(3));
    assert_eq!(
        vm.vcpu_load(0, 7, true).unwrap_err(),
        HypError::NoSuchPcpu(7)
    );
    assert!(vm.vsgi_set_pending(0, 16).is_err());
    assert!(matches!(
        vm.vsgi_configure(0, 16, SgiConfig::default()),
        Err(HypError::Invalid(_))
    ));
    assert!(Vm::create(
        Arc::clone(&h),
        VmParams {
            vcpus: 0,
            ..VmParams::default()
        }
    )
    .is_err());
    // The ITS's own error for a command the driver sent surfaces as HypError::Command.
    let e = h
        .its_cmds(0, &[gic::ItsCommand::Vsync { vpeid: 999 }])
        .unwrap_err();
    assert!(matches!(e, HypError::Command { its: 0, .. }));
}

#[test]
fn without_the_vpe_lock_a_vsgipendr_read_racing_a_vmovp_is_detected() {
    // The negative control for f3a059219bc7: sample col_idx, let an affinity change to the
    // other cluster slip in between VSGIR and VSGIPENDR, and the GIC reports the access.
    let h = host(1);
    let vm = vm(&h, 1);
    let id = vm.vpeid(0).unwrap() as u64;
    let pe = vm.col_idx(0).unwrap();
    let vl = h.vlpi(pe).unwrap();
    h.write(vl + GICR_VSGIR, 4, id).unwrap();
    assert!(vm.set_affinity(0, 2).unwrap(), "VMOVP to the other cluster");
    h.poll(vl + GICR_VSGIPENDR, 4, "busy", |r| {
        r as u32 & VSGIPENDR_BUSY == 0
    })
    .unwrap();
    assert_eq!(
        unpredictable(&h),
        vec![UnpredictableEvent::VsgiReadWrongRd {
            rd: pe,
            vpeid: id as u32
        }]
    );
    // The locked driver path asks the right redistributor.
    vm.vsgi_pending(0).unwrap();
    assert_eq!(unpredictable(&h).len(), 1);
}

/// B0 (issue 16), Linux/KVM order: `its_vpe_irq_domain_alloc` maps the vPE (VMAPP Alloc on
/// every ITS) when the VM is created; `its_vlpi_map` forwards a device event (DISCARD +
/// VMAPTI); the device fires before the vCPU has ever run. The default doorbell must ring
/// (IHI 0069, GICv4.1 default doorbells: a vPE that is not resident and has a pending,
/// enabled interrupt), KVM's doorbell handler marks the vCPU runnable
/// (`vgic_v4_doorbell_handler`), and the first `vgic_v4_load` delivers the vLPI.
#[test]
fn linux_order_vlpi_to_a_vcpu_that_never_ran_rings_its_doorbell_then_delivers_on_first_load() {
    let h = host(1);
    let vm = vm(&h, 2);
    h.map_device(0, 7, 3).unwrap();
    let lpi = h.alloc_lpis(1).unwrap();
    h.map_host_lpi(0, 7, 1, lpi, 0).unwrap();
    vm.map_vlpi(1, 0, 7, 1, 8400, lpi, 0, 0x40).unwrap();
    assert!(!vm.vcpu_pending(1).unwrap());
    h.gic().send_msi(0, 7, 1).unwrap();
    let db = vm.doorbell(1).unwrap();
    let pe = (0..4)
        .find(|p| h.gic().irq_line(*p))
        .expect("a doorbell IRQ");
    assert_eq!(h.take_irq(pe), Some(db));
    assert_eq!(vm.handle_doorbell(db), Some(1));
    assert!(vm.vcpu_pending(1).unwrap(), "vCPU 1 is runnable");
    vm.vcpu_load(1, 2, true).unwrap();
    guest_ready(&h, 2);
    assert_eq!(guest_drain(&h, 2), vec![8400]);
    // Once it has run and blocked with a doorbell request, the usual rule applies again.
    assert!(!vm.vcpu_put(1, true).unwrap());
    h.gic().send_msi(0, 7, 1).unwrap();
    let pe = (0..4)
        .find(|p| h.gic().irq_line(*p))
        .expect("a doorbell IRQ");
    assert_eq!(h.take_irq(pe), Some(db));
    assert_eq!(h.gic().vpe(vm.vpeid(1).unwrap()).unwrap().doorbells, 2);
}
