//! Boots the project's PVH test kernel on real KVM. Skips loudly without /dev/kvm.

use std::time::{Duration, Instant};

use pvh::test_kernel::{self, Cmdline, Progress, TestKernelParams, BANNER};
use pvh::{ExitStatus, PvhConfig};

fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    println!("SKIP(kvm): /dev/kvm is absent, the PVH boot tests need real KVM");
    false
}

/// Boots the kernel with `cmdline` on `vcpus` vCPUs; returns the status and the serial text.
/// Progress lines, in order.
fn progress(out: &str) -> Vec<Progress> {
    Progress::all(out)
}

fn run(params: TestKernelParams, cmdline: &str, vcpus: usize) -> (ExitStatus, String, Duration) {
    run_mem(params, cmdline, vcpus, 64 << 20)
}

fn run_mem(
    params: TestKernelParams,
    cmdline: &str,
    vcpus: usize,
    memory: u64,
) -> (ExitStatus, String, Duration) {
    let kernel = test_kernel::build(&params).expect("assemble the test kernel");
    let cfg = PvhConfig {
        cmdline: cmdline.to_string(),
        memory,
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
        tick_us: 0,
        period_ticks: 0,
        tsc_pace: false,
        ..Cmdline::default()
    };
    let (status, out, took) = run(TestKernelParams::default(), &c.render(), 1);
    println!("took {took:?}\n{out}");
    assert_eq!(status, ExitStatus::PowerOff(42), "serial:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], BANNER);
    assert_eq!(
        lines[1],
        "params ws_mb=2 dirty_mb=1 reports=4 cpus=1 exit=42 tick_us=0 period_ticks=0 pace=0"
    );
    // 64 MiB minus the 640 KiB - 1 MiB legacy range, from the e820 map in the start info.
    assert_eq!(
        lines[2],
        format!("memmap entries=2 ram_kib={}", 65536 - 384)
    );
    // Each report line carries the TSC since the start of the work, strictly increasing.
    let mut last_tsc = 0;
    for r in 1..=4u64 {
        let p = Progress::parse(lines[2 + r as usize]).unwrap_or_else(|| panic!("{out}"));
        assert_eq!(
            (p.cpu, p.report, p.pages, p.ticks),
            (0, r, r * 256, 0),
            "{out}"
        );
        let tsc = p.tsc.unwrap_or_else(|| panic!("no tsc field:\n{out}"));
        assert!(
            tsc > last_tsc,
            "report {r}: tsc {tsc} after {last_tsc}:\n{out}"
        );
        last_tsc = tsc;
    }
    assert_eq!(lines[7], "poweroff 42");
    assert_eq!(lines.len(), 8);
}

#[test]
fn with_two_vcpus_the_ap_starts_by_init_sipi_and_both_report_in() {
    if !kvm_available() {
        return;
    }
    let c = Cmdline {
        ws_mb: 2,
        dirty_mb: 1,
        reports: 3,
        cpus: 2,
        exit: 7,
        tick_us: 1000,
        period_ticks: 0,
        tsc_pace: false,
        ..Cmdline::default()
    };
    let (status, out, took) = run(TestKernelParams::default(), &c.render(), 2);
    println!("took {took:?}\n{out}");
    assert_eq!(status, ExitStatus::PowerOff(7), "serial:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"cpu 1 up"), "{out}");
    let p = progress(&out);
    for cpu in 0..2 {
        let mine: Vec<(u64, u64)> = p
            .iter()
            .filter(|x| x.cpu == cpu)
            .map(|x| (x.report, x.pages))
            .collect();
        assert_eq!(
            mine,
            vec![(1, 256), (2, 512), (3, 768)],
            "cpu {cpu}:\n{out}"
        );
    }
    assert_eq!(lines.last(), Some(&"poweroff 7"));
}

#[test]
fn an_ap_the_guest_never_starts_does_not_keep_the_vm_from_stopping() {
    if !kvm_available() {
        return;
    }
    // Two vCPUs, but the kernel is told to use one: vCPU 1 stays UNINITIALIZED in KVM_RUN.
    let (status, out, took) = finishes(|| run(TestKernelParams::default(), "cpus=1 exit=11", 2));
    println!("took {took:?}");
    assert_eq!(status, ExitStatus::PowerOff(11), "{out}");
    assert!(!out.contains("cpu 1"), "{out}");
}

#[test]
fn elf32_image_boots_and_missing_keys_take_their_defaults() {
    if !kvm_available() {
        return;
    }
    let (status, out, took) = run(TestKernelParams { elf32: true }, "", 1);
    println!("took {took:?}\n{out}");
    let d = Cmdline::default();
    assert_eq!(status, ExitStatus::PowerOff(d.exit), "serial:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], BANNER);
    assert_eq!(lines[1], format!("params {}", d.render()));
    assert_eq!(progress(&out).len() as u64, d.reports);
}

#[test]
fn guest_larger_than_the_hole_sees_ram_above_4g_in_its_e820_map() {
    if !kvm_available() {
        return;
    }
    // 3 GiB below the hole, 1 GiB above 4 GiB; MAP_NORESERVE keeps the host cost to what the
    // guest touches.
    let mem = 4u64 << 30;
    let (status, out, _) = run_mem(TestKernelParams::default(), "reports=1 exit=3", 1, mem);
    assert_eq!(status, ExitStatus::PowerOff(3), "serial:\n{out}");
    let kib = (mem >> 10) - 384;
    assert!(
        out.lines()
            .any(|l| l == format!("memmap entries=3 ram_kib={kib}")),
        "{out}"
    );
}

#[test]
fn dirtying_writes_reach_guest_memory_in_each_cpus_working_set() {
    if !kvm_available() {
        return;
    }
    let kernel = test_kernel::build(&TestKernelParams::default()).expect("assemble");
    let c = Cmdline {
        ws_mb: 1,
        dirty_mb: 1,
        reports: 2,
        cpus: 2,
        exit: 0,
        ..Cmdline::default()
    };
    let cfg = PvhConfig {
        cmdline: c.render(),
        memory: 64 << 20,
        vcpus: 2,
        ..PvhConfig::new(kernel)
    };
    let mut vm = pvh::boot(&cfg).expect("boot");
    let st = vm
        .run_until_exit(Some(Duration::from_secs(60)))
        .expect("run");
    assert_eq!(st, ExitStatus::PowerOff(0));
    // Each CPU wrote its 256-page working set twice; page i holds 256 + i + 1 (the counter of
    // the second sweep).
    for cpu in 0..2u64 {
        let base = test_kernel::WS_GPA + cpu * (1 << 20);
        for page in [0u64, 1, 255] {
            let v = vm.ram().read_u64(base + page * 4096).expect("read");
            assert_eq!(v, 256 + page + 1, "cpu {cpu} page {page}");
        }
    }
}

#[test]
fn non_pvh_elf_is_rejected_with_a_typed_error_before_kvm_is_touched() {
    let mut kernel = test_kernel::build(&TestKernelParams::default()).expect("assemble");
    // Corrupt the type of the note named "Xen" (the 4 bytes before its name).
    let img = pvh::elf::parse(&kernel).expect("parse");
    assert_eq!(img.entry, test_kernel::KERNEL_GPA as u32);
    let pos = kernel
        .windows(4)
        .position(|w| w == b"Xen\0")
        .expect("note name");
    kernel[pos - 4] = 0x11;
    let err = pvh::boot(&PvhConfig::new(kernel)).expect_err("must fail");
    assert!(
        matches!(err, pvh::PvhError::Load(pvh::LoadError::NoPvhNote)),
        "{err}"
    );
}

#[test]
fn lapic_timer_fires_in_ring_3_and_paces_the_reports() {
    if !kvm_available() {
        return;
    }
    // 1 ms ticks, one report per 20 ticks: 5 reports take about 100 ms of guest time.
    let c = Cmdline {
        reports: 5,
        tick_us: 1000,
        period_ticks: 20,
        exit: 9,
        ..Cmdline::default()
    };
    let (status, out, took) = run(TestKernelParams::default(), &c.render(), 1);
    println!("took {took:?}\n{out}");
    assert_eq!(status, ExitStatus::PowerOff(9), "serial:\n{out}");
    let p = progress(&out);
    assert_eq!(p.len(), 5, "{out}");
    for (
        i,
        &Progress {
            report: r, ticks, ..
        },
    ) in p.iter().enumerate()
    {
        assert_eq!(r, i as u64 + 1);
        assert!(
            ticks >= r * 20,
            "report {r} came after only {ticks} ticks:\n{out}"
        );
    }
    assert!(
        took >= Duration::from_millis(90),
        "100 ticks of 1 ms passed in {took:?}"
    );
}

#[test]
fn tsc_paced_reports_keep_the_schedule_and_the_timer_still_ticks() {
    if !kvm_available() {
        return;
    }
    // pace=1: 32 ticks of TSC calibration, then report r is due r * 20 ticks' worth of TSC
    // after that: 5 reports take about 32 + 100 ms.
    let c = Cmdline {
        reports: 5,
        tick_us: 1000,
        period_ticks: 20,
        exit: 11,
        tsc_pace: true,
        ..Cmdline::default()
    };
    let (status, out, took) = run(TestKernelParams::default(), &c.render(), 1);
    println!("took {took:?}\n{out}");
    assert_eq!(status, ExitStatus::PowerOff(11), "serial:\n{out}");
    assert!(out.contains(" pace=1\n"), "{out}");
    let p = progress(&out);
    assert_eq!(p.len(), 5, "{out}");
    for w in p.windows(2) {
        // Tick counts never go back. A report that catches up with its TSC schedule after a
        // host stall may come without a tick in between, so per pair only order is asserted.
        assert!(
            w[1].ticks >= w[0].ticks,
            "ticks {:?} -> {:?}:\n{out}",
            w[0],
            w[1]
        );
    }
    // The timer keeps ticking over the run (about 20 ticks per report; how many depends on
    // how many ticks a busy host coalesces, so only that it ticked is asserted).
    assert!(
        p[4].ticks > p[0].ticks,
        "ticks {:?} -> {:?}:\n{out}",
        p[0],
        p[4]
    );
    assert_tsc_schedule(&out, &c);
    assert!(
        took >= Duration::from_millis(125),
        "132 ms of schedule passed in {took:?}"
    );
}

/// Checks every CPU's TSC-stamped reports against its pacing rule: with `pace=1` report `r`
/// goes out only once the TSC has advanced `r * period_ticks * N` from the schedule start
/// (`N` = the CPU's `tsc_per_tick` line), and its `tsc` field is read after that wait. So
/// the TSC values strictly increase, each is at least its due time, and the write rate
/// they give from the schedule start (pages over TSC, the TSC converted with the kernel's
/// own calibration) never exceeds the nominal `dirty_mb` per `period_ticks * tick_us`.
fn assert_tsc_schedule(out: &str, c: &Cmdline) {
    let p = progress(out);
    for cpu in 0..c.cpus {
        let n = test_kernel::tsc_per_tick(out, cpu)
            .unwrap_or_else(|| panic!("cpu {cpu}: no tsc_per_tick line:\n{out}"));
        assert!(n > 0, "cpu {cpu}: tsc_per_tick 0:\n{out}");
        let mine: Vec<&Progress> = p.iter().filter(|x| x.cpu == cpu).collect();
        assert_eq!(mine.len() as u64, c.reports, "cpu {cpu}:\n{out}");
        let mut last = 0;
        for x in mine {
            let tsc = x
                .tsc
                .unwrap_or_else(|| panic!("no tsc field in {x}:\n{out}"));
            assert!(tsc > last, "cpu {cpu}: tsc {tsc} after {last}:\n{out}");
            last = tsc;
            let due = x.report * c.period_ticks * n;
            assert!(tsc >= due, "{x}: due at tsc {due}:\n{out}");
            let secs = tsc as f64 / (n as f64 * 1e6 / c.tick_us as f64);
            let mib_s = x.pages as f64 / 256.0 / secs;
            let nominal = c.dirty_mb as f64 / (c.period_ticks * c.tick_us) as f64 * 1e6;
            assert!(
                mib_s <= nominal * (1.0 + 1e-12),
                "{x}: {mib_s} MiB/s against a nominal {nominal}:\n{out}"
            );
        }
    }
}

#[test]
fn tsc_paced_reports_carry_a_tsc_at_or_after_their_due_time_on_every_cpu() {
    if !kvm_available() {
        return;
    }
    // Two CPUs, 1 ms ticks, 1 MiB per 10 ticks (100 MiB/s nominal each), 6 reports.
    let c = Cmdline {
        ws_mb: 2,
        dirty_mb: 1,
        reports: 6,
        cpus: 2,
        exit: 13,
        tick_us: 1000,
        period_ticks: 10,
        tsc_pace: true,
        ..Cmdline::default()
    };
    let (status, out, _) = run(TestKernelParams::default(), &c.render(), 2);
    println!("{out}");
    assert_eq!(status, ExitStatus::PowerOff(13), "serial:\n{out}");
    assert_tsc_schedule(&out, &c);
}

/// A one-segment PVH kernel at 1 MiB from 32-bit code (`body` gets the assembler positioned
/// at the entry), with a flat GDT (code 0x08, data 0x10) at 0x101000 and an IDT at 0x101100
/// whose gate 0x20 points at label `isr` if the body sets it; ESP at the image's end.
fn tiny_kernel(
    body: impl FnOnce(&mut iced_x86::code_asm::CodeAssembler, &mut iced_x86::code_asm::CodeLabel),
) -> Vec<u8> {
    use iced_x86::code_asm::*;
    const BASE: u64 = 0x10_0000;
    const GDT: u64 = 0x10_1000;
    const IDT: u64 = 0x10_1100;
    let mut a = CodeAssembler::new(32).unwrap();
    let mut isr = a.create_label();
    a.lgdt(ptr(GDT as u32 + 0x20)).unwrap();
    a.lidt(ptr(GDT as u32 + 0x30)).unwrap();
    a.mov(esp, BASE as u32 + 0x1ff0).unwrap();
    body(&mut a, &mut isr);
    let r = a
        .assemble_options(
            BASE,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .unwrap();
    let isr_ip = r.label_ip(&isr).unwrap_or(0);
    let mut img = r.inner.code_buffer;
    img.resize(0x2000, 0);
    let put = |img: &mut Vec<u8>, at: u64, b: &[u8]| {
        let o = (at - BASE) as usize;
        img[o..o + b.len()].copy_from_slice(b);
    };
    put(&mut img, GDT + 8, &0x00cf_9a00_0000_ffffu64.to_le_bytes());
    put(&mut img, GDT + 16, &0x00cf_9200_0000_ffffu64.to_le_bytes());
    put(&mut img, GDT + 0x20, &23u16.to_le_bytes());
    put(&mut img, GDT + 0x22, &(GDT as u32).to_le_bytes());
    put(&mut img, GDT + 0x30, &(256u16 * 8 - 1).to_le_bytes());
    put(&mut img, GDT + 0x32, &(IDT as u32).to_le_bytes());
    if isr_ip != 0 {
        // 32-bit interrupt gate, DPL 0, selector 0x08.
        let gate = (isr_ip & 0xffff) | (0x08 << 16) | (0x8e00u64 << 32) | ((isr_ip >> 16) << 48);
        put(&mut img, IDT + 0x20 * 8, &gate.to_le_bytes());
    }
    pvh::elf::write(
        pvh::elf::Class::Elf32,
        &[pvh::elf::OutSegment {
            paddr: BASE,
            data: img,
            memsz: 0x2000,
        }],
        Some(BASE as u32),
    )
}

/// Boots `kernel` and runs it to its exit or `timeout`; returns the status, the time it ran
/// (printed, never asserted) and how often vCPU 0 halted in the in-kernel LAPIC
/// (KVM's `halt_exits`).
fn boot_tiny(kernel: Vec<u8>, timeout: Duration) -> (pvh::Result<ExitStatus>, Duration, u64) {
    let mut vm = pvh::boot(&PvhConfig::new(kernel)).expect("boot");
    let t = Instant::now();
    let r = vm.run_until_exit(Some(timeout));
    let halts = vm
        .vm()
        .vcpu_stat(0, "halt_exits")
        .expect("KVM statistics")
        .expect("this KVM counts halt_exits");
    (r, t.elapsed(), halts)
}

/// Runs `f` on its own thread and returns its result; a test that would hang (a vCPU that
/// cannot be stopped) fails after `HANG` instead. This is a hang detector, not a measurement.
fn finishes<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    const HANG: Duration = Duration::from_secs(120);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(HANG)
        .unwrap_or_else(|_| panic!("still running after {HANG:?}: the VM could not be stopped"))
}

#[test]
fn guest_fault_without_a_handler_is_reported_as_a_crash_with_registers() {
    if !kvm_available() {
        return;
    }
    // #UD with an empty IDT: #UD -> #GP/#DF -> triple fault.
    let k = tiny_kernel(|a, _| {
        a.mov(iced_x86::code_asm::eax, 0x1234_5678u32).unwrap();
        a.ud2().unwrap();
    });
    let (r, _, _) = boot_tiny(k, Duration::from_secs(30));
    match r {
        Ok(ExitStatus::Crashed { vcpu: 0, detail }) => {
            assert!(detail.contains("rax=0x12345678"), "{detail}")
        }
        other => panic!("expected a crash, got {other:?}"),
    }
}

#[test]
fn timeout_stops_a_vcpu_halted_with_interrupts_off() {
    if !kvm_available() {
        return;
    }
    // cli; hlt blocks in the in-kernel LAPIC forever: only the kick gets the thread out.
    let k = tiny_kernel(|a, _| {
        a.cli().unwrap();
        a.hlt().unwrap();
    });
    let (r, took, halts) = finishes(move || boot_tiny(k, Duration::from_millis(200)));
    println!("stopped after {took:?}, {halts} halt(s)");
    assert_eq!(r.expect("run"), ExitStatus::TimedOut);
    // It was halted in the kernel, which only the kick ends.
    assert!(halts >= 1, "vCPU 0 never halted");
}

#[test]
fn tsc_deadline_timer_in_x2apic_mode_wakes_a_halted_vcpu() {
    if !kvm_available() {
        return;
    }
    use iced_x86::code_asm::*;
    let k = tiny_kernel(|a, isr| {
        // x2APIC on (IA32_APIC_BASE.EN|EXTD), software-enabled (SVR), LVT timer in
        // TSC-deadline mode with vector 0x20, deadline = now + 2^24 TSC ticks, then halt.
        a.mov(ecx, 0x1bu32).unwrap();
        a.rdmsr().unwrap();
        a.or(eax, 0xc00).unwrap();
        a.wrmsr().unwrap();
        a.xor(edx, edx).unwrap();
        a.mov(ecx, 0x80fu32).unwrap();
        a.mov(eax, 0x1ffu32).unwrap();
        a.wrmsr().unwrap();
        a.mov(ecx, 0x832u32).unwrap();
        a.mov(eax, 0x4_0020u32).unwrap();
        a.wrmsr().unwrap();
        a.rdtsc().unwrap();
        a.add(eax, 1 << 24).unwrap();
        a.adc(edx, 0).unwrap();
        a.mov(ecx, 0x6e0u32).unwrap();
        a.wrmsr().unwrap();
        a.sti().unwrap();
        a.hlt().unwrap();
        // Woken without the interrupt: status 1.
        a.mov(al, 1u32).unwrap();
        a.mov(edx, u32::from(pvh::EXIT_PORT)).unwrap();
        a.out(dx, al).unwrap();
        a.set_label(isr).unwrap();
        a.mov(al, 42u32).unwrap();
        a.mov(edx, u32::from(pvh::EXIT_PORT)).unwrap();
        a.out(dx, al).unwrap();
        a.hlt().unwrap();
    });
    let (r, took, _) = boot_tiny(k, Duration::from_secs(30));
    println!("took {took:?}");
    assert_eq!(r.expect("run"), ExitStatus::PowerOff(42));
}

#[test]
fn working_sets_larger_than_ram_make_the_kernel_refuse_with_its_status() {
    if !kvm_available() {
        return;
    }
    // 16 MiB + 2 * 32 MiB > 64 MiB of RAM.
    let (status, out, _) = run(TestKernelParams::default(), "ws_mb=32 cpus=2", 2);
    assert_eq!(
        status,
        ExitStatus::PowerOff(test_kernel::NO_FIT_STATUS),
        "{out}"
    );
    assert!(
        out.contains("working sets do not fit in RAM below 4 GiB"),
        "{out}"
    );
    assert!(!out.contains("progress"), "{out}");
    // Exactly at the limit (16 + 2 * 24 = 64 MiB) it runs.
    let (status, out, _) = run(TestKernelParams::default(), "ws_mb=24 cpus=2 reports=1", 2);
    assert_eq!(status, ExitStatus::PowerOff(0), "{out}");
}

#[test]
fn cpl0_int_n_is_an_emulation_error_on_pvm_and_runs_elsewhere() {
    if !kvm_available() {
        return;
    }
    use iced_x86::code_asm::*;
    // `int 0x20` at CPL0 through a valid gate to a handler that powers off with 42. PVM's
    // instruction emulator cannot execute protected-mode INT n: KVM_EXIT_INTERNAL_ERROR.
    let k = tiny_kernel(|a, isr| {
        a.int(0x20).unwrap();
        a.mov(al, 1u32).unwrap();
        a.mov(edx, u32::from(pvh::EXIT_PORT)).unwrap();
        a.out(dx, al).unwrap();
        a.set_label(isr).unwrap();
        a.mov(al, 42u32).unwrap();
        a.mov(edx, u32::from(pvh::EXIT_PORT)).unwrap();
        a.out(dx, al).unwrap();
    });
    let (r, _, _) = boot_tiny(k, Duration::from_secs(30));
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        match r {
            Err(pvh::PvhError::Emulation { vcpu: 0, detail }) => {
                println!("{detail}");
                assert!(detail.contains("cpl=0"), "{detail}");
                // KVM_INTERNAL_ERROR_EMULATION.
                assert!(detail.starts_with("suberror 1 "), "{detail}");
            }
            other => panic!("expected an emulation error on PVM, got {other:?}"),
        }
    } else {
        assert_eq!(r.expect("run"), ExitStatus::PowerOff(42));
    }
}

#[test]
fn unbounded_run_powers_off_when_q_arrives_on_the_serial_port() {
    if !kvm_available() {
        return;
    }
    let kernel = test_kernel::build(&TestKernelParams::default()).expect("assemble");
    let c = Cmdline {
        cpus: 2,
        reports: 0,
        ws_mb: 1,
        period_ticks: 10,
        exit: 21,
        ..Cmdline::default()
    };
    let cfg = PvhConfig {
        cmdline: c.render(),
        memory: 64 << 20,
        vcpus: 2,
        ..PvhConfig::new(kernel)
    };
    let mut vm = pvh::boot(&cfg).expect("boot");
    let input = vm.serial_input();
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        input.send(&[test_kernel::POWER_OFF_KEY])
    });
    let st = vm
        .run_until_exit(Some(Duration::from_secs(30)))
        .expect("run");
    assert_eq!(sender.join().expect("sender"), 1);
    let out = String::from_utf8_lossy(&vm.serial_output()).into_owned();
    assert_eq!(st, ExitStatus::PowerOff(21), "{out}");
    // ~150 ms at one report per 10 ms per CPU: several reports from each CPU before the stop.
    let p = progress(&out);
    for cpu in 0..2 {
        let n = p.iter().filter(|x| x.cpu == cpu).count();
        assert!(n >= 3, "cpu {cpu} reported {n} times:\n{out}");
    }
    assert_eq!(out.lines().last(), Some("poweroff 21"), "{out}");
}
