//! Working sets continue across the MMIO hole: with `ws_mb` covering more than the RAM below
//! 3 GiB, the test kernel writes on into the RAM above 4 GiB, so a 4 GiB guest can dirty all
//! of its memory (issue 14's "writes spread over all RAM"). Without `/dev/kvm` the test prints
//! a `SKIP(kvm)` line.

use std::time::Duration;

use pvh::test_kernel::{self, Cmdline, TestKernelParams, WS_GPA};
use pvh::{ExitStatus, PvhConfig};

/// Boots the test kernel with `c` on one vCPU and `memory` bytes, runs it until it powers off
/// with `c.exit`; returns the VM and its console.
fn run_to_exit(c: &Cmdline, memory: u64) -> (pvh::PvhVm, String) {
    let kernel = test_kernel::build(&TestKernelParams::default()).expect("assemble");
    let cfg = PvhConfig {
        cmdline: c.render(),
        memory,
        vcpus: 1,
        ..PvhConfig::new(kernel)
    };
    let mut vm = pvh::boot(&cfg).expect("boot");
    let st = vm
        .run_until_exit(Some(Duration::from_secs(300)))
        .expect("run");
    let out = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    assert_eq!(st, ExitStatus::PowerOff(c.exit), "{out}");
    (vm, out)
}

#[test]
fn a_working_set_larger_than_low_ram_continues_above_4_gib() {
    if !vmm::kvm_available() {
        println!("SKIP(kvm): /dev/kvm is absent, the PVH boot tests need real KVM");
        return;
    }
    // 3 GiB + 64 MiB of RAM: 3 GiB below the hole, 64 MiB at 4 GiB. The working set is all
    // of it past the kernel's 16 MiB, written once.
    let memory = (3u64 << 30) + (64 << 20);
    let ws_mb = (memory - WS_GPA) >> 20;
    let c = Cmdline {
        ws_mb,
        dirty_mb: ws_mb,
        reports: 1,
        tick_us: 0,
        exit: 4,
        ..Cmdline::default()
    };
    assert_eq!(c.memory_needed(), memory);
    let (vm, out) = run_to_exit(&c, memory);
    let pages = ws_mb << 8;
    assert!(out.contains(&format!("progress 1 pages {pages} ")), "{out}");
    // Page i of the working set holds i + 1; the last low page is just below 3 GiB, the
    // next one is at 4 GiB, the last one at 4 GiB + 64 MiB - 4 KiB.
    let ram = vm.ram();
    let low_pages = ((3u64 << 30) - WS_GPA) >> 12;
    assert_eq!(ram.read_u64((3u64 << 30) - 4096).unwrap(), low_pages);
    assert_eq!(ram.read_u64(4u64 << 30).unwrap(), low_pages + 1);
    assert_eq!(
        ram.read_u64((4u64 << 30) + (64 << 20) - 4096).unwrap(),
        pages
    );
}

#[test]
fn random_writes_land_on_pages_spread_over_the_working_set() {
    if !vmm::kvm_available() {
        println!("SKIP(kvm): /dev/kvm is absent, the PVH boot tests need real KVM");
        return;
    }
    // 1024 pages, 256 writes at random.
    let c = Cmdline {
        ws_mb: 4,
        dirty_mb: 1,
        reports: 1,
        tick_us: 0,
        exit: 6,
        random: true,
        ..Cmdline::default()
    };
    let (vm, out) = run_to_exit(&c, 64 << 20);
    assert!(out.contains("progress 1 pages 256 "), "{out}");
    let ram = vm.ram();
    let values: Vec<u64> = (0..1024u64)
        .map(|p| ram.read_u64(WS_GPA + p * 4096).unwrap())
        .collect();
    let written: Vec<u64> = (0..1024u64).filter(|&p| values[p as usize] != 0).collect();
    // Each write stores the count so far (1..=256); a page written twice keeps the later.
    assert!(values.iter().all(|&v| v <= 256), "{values:?}");
    assert!(values.contains(&256), "the last write is there");
    assert!(
        (150..256).contains(&written.len()),
        "256 draws from 1024 pages hit about 226 distinct ones: {}",
        written.len()
    );
    assert!(
        written.iter().filter(|&&p| p >= 512).count() > 50,
        "not the in-order prefix: {written:?}"
    );
}
