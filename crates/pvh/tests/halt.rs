//! A paced test kernel waits for its timer with HLT (through its #UD halt call), which KVM's
//! in-kernel LAPIC handles by blocking the vCPU thread: the VMM process must use far less CPU
//! than wall-clock time. Its own test binary, so no other test's CPU time is counted.

use std::time::{Duration, Instant};

use pvh::test_kernel::{self, Cmdline, TestKernelParams};
use pvh::{ExitStatus, PvhConfig};

/// utime + stime of this process in clock ticks (USER_HZ, 100 on Linux).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn paced_guest_halts_in_the_in_kernel_lapic_instead_of_spinning() {
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("SKIP(kvm): /dev/kvm is absent, the PVH boot tests need real KVM");
        return;
    }
    let kernel = test_kernel::build(&TestKernelParams::default()).expect("assemble");
    // 2 vCPUs, 1 ms ticks, a report every 100 ticks, 4 reports: ~400 ms of waiting per CPU.
    let c = Cmdline {
        cpus: 2,
        reports: 4,
        tick_us: 1000,
        period_ticks: 100,
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
    let (t, c0) = (Instant::now(), cpu_ticks());
    let st = vm
        .run_until_exit(Some(Duration::from_secs(60)))
        .expect("run");
    let (wall, cpu) = (t.elapsed(), cpu_ticks() - c0);
    let out = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    println!("wall {wall:?}, cpu {} ms\n{out}", cpu * 10);
    assert_eq!(st, ExitStatus::PowerOff(5), "{out}");
    assert!(wall >= Duration::from_millis(380), "{wall:?}");
    // Two spinning vCPUs would use ~2x wall time; halting ones a small fraction of it.
    let wall_ticks = wall.as_millis() as u64 / 10;
    assert!(
        cpu * 2 < wall_ticks,
        "used {cpu} CPU ticks in {wall_ticks} wall ticks"
    );
}
