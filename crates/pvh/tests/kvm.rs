//! Boots the project's PVH test kernel on real KVM. Skips loudly without /dev/kvm.

use std::time::{Duration, Instant};

use pvh::test_kernel::{self, Cmdline, TestKernelParams, BANNER};
use pvh::{ExitStatus, PvhConfig};

fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    println!("SKIP(kvm): /dev/kvm is absent, the PVH boot tests need real KVM");
    false
}

/// Boots the kernel with `cmdline` on `vcpus` vCPUs; returns the status and the serial text.
fn run(params: TestKernelParams, cmdline: &str, vcpus: usize) -> (ExitStatus, String, Duration) {
    let kernel = test_kernel::build(&params).expect("assemble the test kernel");
    let cfg = PvhConfig {
        cmdline: cmdline.to_string(),
        memory: 64 << 20,
        vcpus,
        ..PvhConfig::new(kernel)
    };
    let t = Instant::now();
    let mut vm = pvh::boot(&cfg).expect("boot");
    let status = vm.run_until_exit(Some(Duration::from_secs(60)));
    let out = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    let status = status.unwrap_or_else(|e| panic!("run failed: {e}\nserial:\n{out}"));
    (status, out, t.elapsed())
}

#[test]
fn test_kernel_boots_prints_banner_honours_cmdline_and_powers_off_with_status() {
    if !kvm_available() {
        return;
    }
    let c = Cmdline {
        ws_mb: 2,
        dirty_mb: 1,
        reports: 4,
        cpus: 1,
        exit: 42,
    };
    let (status, out, took) = run(TestKernelParams::default(), &c.render(), 1);
    println!("took {took:?}\n{out}");
    assert_eq!(status, ExitStatus::PowerOff(42), "serial:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], BANNER);
    assert_eq!(
        lines[1],
        "params ws_mb=2 dirty_mb=1 reports=4 cpus=1 exit=42"
    );
    // 64 MiB minus the 640 KiB - 1 MiB legacy range, from the e820 map in the start info.
    assert_eq!(
        lines[2],
        format!("memmap entries=2 ram_kib={}", 65536 - 384)
    );
    for r in 1..=4u64 {
        assert_eq!(
            lines[2 + r as usize],
            format!("cpu 0 progress {r} pages {}", r * 256)
        );
    }
    assert_eq!(lines[7], "poweroff 42");
    assert_eq!(lines.len(), 8);
}
