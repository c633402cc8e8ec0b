//! A paced test kernel waits for its timer with HLT (through its #UD halt call), which KVM's
//! in-kernel LAPIC handles by blocking the vCPU thread instead of spinning. KVM's own
//! per-vCPU statistics (`halt_exits`, `KVM_GET_STATS_FD`) show the decision: every vCPU
//! halted in the kernel for its timer waits. (How much CPU that saves is for a benchmark.)

use std::time::Duration;

use pvh::test_kernel::{self, Cmdline, TestKernelParams};
use pvh::{ExitStatus, PvhConfig};

#[test]
fn paced_guest_halts_in_the_in_kernel_lapic_instead_of_spinning() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP(kvm): /dev/kvm is absent, the PVH boot tests need real KVM");
        return;
    }
    let kernel = test_kernel::build(&TestKernelParams::default()).expect("assemble");
    // 2 vCPUs, 1 ms ticks, a report every 100 ticks, 4 reports: each CPU waits for about 400
    // timer ticks, with HLT between them.
    let (reports, period_ticks) = (4, 100);
    let c = Cmdline {
        cpus: 2,
        reports,
        tick_us: 1000,
        period_ticks,
        exit: 5,
        ..Cmdline::default()
    };
    let cfg = PvhConfig {
        cmdline: c.render(),
        memory: 64 << 20,
        vcpus: 2,
        ..PvhConfig::new(kernel)
    };
    let mut vm = pvh::boot(&cfg).expect("boot");
    let halts = |vm: &pvh::PvhVm, i| {
        vm.vm()
            .vcpu_stat(i, "halt_exits")
            .expect("KVM statistics")
            .expect("this KVM counts halt_exits")
    };
    let before = [halts(&vm, 0), halts(&vm, 1)];
    let st = vm
        .run_until_exit(Some(Duration::from_secs(60)))
        .expect("run");
    let out = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    let after = [halts(&vm, 0), halts(&vm, 1)];
    println!("halt_exits {before:?} -> {after:?}\n{out}");
    assert_eq!(st, ExitStatus::PowerOff(5), "{out}");
    // A spinning wait never executes HLT; a halting one halts about once per tick (a tick
    // that arrives while the CPU is busy saves one, so half is the floor asserted).
    for i in 0..2 {
        let n = after[i] - before[i];
        assert!(
            n >= reports * period_ticks / 2,
            "vCPU {i} halted {n} times while waiting for {} ticks",
            reports * period_ticks
        );
    }
}
