//! `timer=tsc-deadline`: the test kernel keeps time as Linux and the third-party guest of
//! issue 14 do, on the LAPIC timer's TSC-deadline mode re-armed by a CPL0 `wrmsr` at every
//! tick, halting in between. Without `/dev/kvm` the test prints a `SKIP(kvm)` line.

use std::time::Duration;

use pvh::test_kernel::{self, Cmdline, Progress, TestKernelParams};
use pvh::{ExitStatus, PvhConfig};

/// LVT timer register offset in the LAPIC page, and its mode field (bits 17-18).
const LVT_TIMER: usize = 0x320;
const LVT_MODE_SHIFT: u32 = 17;
const MODE_TSC_DEADLINE: u32 = 0b10;

#[test]
fn tsc_deadline_timer_paces_reports_and_leaves_the_lapic_in_deadline_mode() {
    if !vmm::kvm_available() {
        println!("SKIP(kvm): /dev/kvm is absent, the PVH boot tests need real KVM");
        return;
    }
    let kernel = test_kernel::build(&TestKernelParams::default()).expect("assemble");
    // 2 ms ticks (the guest), a report every 25 ticks, 4 reports, with CPL0 boot
    // stores and ISR stores: the whole third-party profile on a small guest.
    let c = Cmdline {
        cpus: 1,
        reports: 4,
        tick_us: 2000,
        period_ticks: 25,
        tsc_pace: true,
        tsc_deadline: true,
        boot_writes: 64,
        isr_writes: 2,
        exit: 9,
        ..Cmdline::default()
    };
    assert!(
        c.render().ends_with(" timer=tsc-deadline"),
        "{}",
        c.render()
    );
    let cfg = PvhConfig {
        cmdline: c.render(),
        memory: 64 << 20,
        vcpus: 1,
        ..PvhConfig::new(kernel)
    };
    let mut vm = pvh::boot(&cfg).expect("boot");
    let st = vm
        .run_until_exit(Some(Duration::from_secs(120)))
        .expect("run");
    let out = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    println!("{out}");
    assert_eq!(st, ExitStatus::PowerOff(9), "{out}");
    let per_tick: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("timer tsc-deadline "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no calibration line: {out}"));
    assert!(per_tick > 0, "{out}");
    // The last report came after at least 4 periods of deadline-mode ticks.
    let reports = Progress::all(&out);
    let ticks: Vec<u64> = reports.iter().map(|p| p.ticks).collect();
    assert_eq!(ticks.len(), 4, "{out}");
    assert!(ticks.windows(2).all(|w| w[1] > w[0]), "ticks {ticks:?}");
    // Each report's TSC (from the schedule start) is at least its due time under pace=1.
    let n = test_kernel::tsc_per_tick(&out, 0).unwrap_or_else(|| panic!("{out}"));
    // pace=1 paces with the deadline timer's own calibration (the ticks' TSC period), not
    // with a second measurement on ticks that the host may coalesce.
    assert_eq!(n, per_tick, "{out}");
    for p in &reports {
        let tsc = p.tsc.unwrap_or_else(|| panic!("no tsc in {p}"));
        assert!(tsc >= p.report * 25 * n, "{p}: tsc_per_tick {n}");
    }
    let states = vm.vm().save_vcpus().expect("save vCPU state");
    let lapic = states[0].lapic.as_ref().expect("in-kernel LAPIC state");
    let lvt = u32::from_le_bytes(
        lapic.regs[LVT_TIMER..LVT_TIMER + 4]
            .iter()
            .map(|&b| b as u8)
            .collect::<Vec<u8>>()
            .try_into()
            .unwrap(),
    );
    assert_eq!(
        (lvt >> LVT_MODE_SHIFT) & 0b11,
        MODE_TSC_DEADLINE,
        "LVT timer {lvt:#x}"
    );
}
