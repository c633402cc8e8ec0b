//! A real Linux guest (built by `scripts/linux-guest/build.sh`: Debian's linux-source with a
//! tiny config, busybox-static, the project's /init) on real KVM, one boot for the whole file:
//! the kernel reaches user space on 2 vCPUs, both online; the heartbeat keeps its buffer
//! intact; an interactive shell answers on the serial console; `rv-poweroff` powers the VM off
//! with its status. Slow on a PVM host (1-2 minutes to user space); prints `SKIP(kvm)` without
//! `/dev/kvm` and never skips with it (a missing kernel is built first).

#[path = "support/linux_guest.rs"]
mod linux_guest;

use std::time::{Duration, Instant};

use linux_guest::{beats, has_after, has_line, tail, wait_console, BOOT_TIMEOUT};
use pvh::ExitStatus;

const BANNER: &str = "ringvisor-guest: v1 up";

#[test]
fn linux_boots_to_a_shell_on_two_online_vcpus_and_powers_off_on_request() {
    let Some(g) = linux_guest::guest() else {
        return;
    };
    let cfg = linux_guest::config(&g, 2, 128 << 20, "rv_period_ms=250 rv_buf_kb=2048");
    let t0 = Instant::now();
    let mut vm = pvh::boot(&cfg).expect("boot");
    vm.start().expect("start");
    let banner = wait_console(vm.vm(), "the /init banner", BOOT_TIMEOUT, |c| {
        has_line(c, BANNER)
    });
    let c = vm.serial_capture();
    let text = String::from_utf8_lossy(&c.bytes).into_owned();
    let first_kernel_line = c.line_ends.first().map(|&(_, t)| t);
    eprintln!(
        "linux: /init banner after {:.1} s; first console line {:?} ns",
        banner.as_secs_f64(),
        first_kernel_line
    );
    // Every vCPU came up through the MP table and INIT/SIPI.
    let line = text
        .lines()
        .find(|l| l.contains(BANNER))
        .expect("banner line");
    assert!(line.contains("cpus online 0-1,"), "{line}");

    // The heartbeat runs and its buffer holds what it wrote.
    wait_console(vm.vm(), "3 heartbeats", Duration::from_secs(120), |c| {
        beats(c).len() >= 3
    });
    let b = beats(&vm.serial_capture());
    assert!(b.iter().all(|x| x.bad == 0), "{b:?}");
    for w in b.windows(2) {
        assert_eq!(w[1].n, w[0].n + 1, "{b:?}");
    }

    // The shell: wait for its prompt, then a command whose answer only a shell computes,
    // and a file only a Linux with both CPUs online holds.
    wait_console(vm.vm(), "the shell prompt", Duration::from_secs(300), |c| {
        has_after(c, 0, "# ")
    });
    let input = vm.serial_input();
    let from = vm.serial_capture().bytes.len();
    let t = Instant::now();
    let cmd = b"echo answer-$((6*7)); cat /sys/devices/system/cpu/online\n";
    assert_eq!(input.send_all(cmd, Duration::from_secs(30)), cmd.len());
    wait_console(
        vm.vm(),
        "the shell's answer",
        Duration::from_secs(120),
        |c| has_after(c, from, "answer-42") && has_after(c, from, "\n0-1"),
    );
    eprintln!(
        "linux: shell answered in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // Power-off on request, with the status given to /bin/rv-poweroff.
    let cmd = b"rv-poweroff 7\n";
    assert_eq!(input.send_all(cmd, Duration::from_secs(30)), cmd.len());
    let status = vm.wait_exit(Some(Duration::from_secs(120))).expect("wait");
    let c = vm.serial_capture();
    assert_eq!(status, ExitStatus::PowerOff(7), "{}", tail(&c, 30));
    assert!(has_after(&c, 0, "ringvisor-guest: poweroff 7"));
    eprintln!(
        "linux: whole run {:.1} s; console tail:\n{}",
        t0.elapsed().as_secs_f64(),
        tail(&c, 12)
    );
}
