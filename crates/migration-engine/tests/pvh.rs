//! Live migration of PVH guests (the project's PVH test kernel: ring-3 dirtying, LAPIC timer,
//! two vCPUs started by INIT/SIPI, console on COM1) on real KVM over real TCP (loopback).
//! Each test prints `SKIP(kvm)` without `/dev/kvm`; `.ci/run` rejects skips on a machine that
//! has it.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use migration_engine::{receive, DestOptions, MigrationSummary, SourceOptions};
use pvh::test_kernel::{self, Cmdline, TestKernelParams, POWER_OFF_KEY};
use pvh::{ExitStatus, PvhConfig, SerialInput};
use vmm::{Tracking, Vm};

/// The tests here measure timing with two 2-vCPU guests' worth of threads on a 2-core host:
/// they run one at a time, whatever the test harness's thread count.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn have_kvm() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; PVH migration test not run");
        return false;
    }
    true
}

/// Timer period and report pacing of the guests here: a 1 ms LAPIC tick, a report every
/// 40 ticks, each CPU dirtying 1 MiB per report (2 CPUs: 50 MiB/s). A report's work is a
/// small part of its period, so the first reports on a destination (whose first guest
/// write to each page faults) still keep the schedule.
const TICK_US: u64 = 1000;
const PERIOD_TICKS: u64 = 40;
const REPORT_PERIOD_MS: f64 = (TICK_US * PERIOD_TICKS) as f64 / 1e3;

fn cmdline(cpus: u64) -> Cmdline {
    Cmdline {
        ws_mb: 16,
        dirty_mb: 1,
        reports: 0,
        cpus,
        exit: 0x2a,
        tick_us: TICK_US,
        period_ticks: PERIOD_TICKS,
        // Keep time by the TSC (migrated with the vCPU), not by counting ticks: the schedule
        // then does not slip by the ticks the host coalesces while the guest is migrated.
        tsc_pace: true,
        ..Cmdline::default()
    }
}

/// Boots the test kernel on `cpus` vCPUs with `tracking` and starts it.
fn boot(tracking: Tracking, cpus: u64) -> pvh::PvhVm {
    let kernel = test_kernel::build(&TestKernelParams::default()).expect("assemble");
    let mut vm = pvh::boot(&PvhConfig {
        cmdline: cmdline(cpus).render(),
        memory: 128 << 20,
        vcpus: cpus as usize,
        tracking: Some(tracking),
        ..PvhConfig::new(kernel)
    })
    .expect("boot");
    vm.start().expect("start");
    vm
}

/// One progress line: (cpu, report, pages, ticks, host time in Unix ns).
#[derive(Debug, Clone, Copy)]
struct Report {
    cpu: u64,
    report: u64,
    pages: u64,
    ticks: u64,
    at_ns: u64,
}

fn reports(c: &vmm::Capture) -> Vec<Report> {
    c.lines()
        .into_iter()
        .filter_map(|(at_ns, l)| {
            let w: Vec<&str> = l.split(' ').collect();
            match w.as_slice() {
                ["cpu", c, "progress", r, "pages", p, "ticks", t] => Some(Report {
                    cpu: c.parse().ok()?,
                    report: r.parse().ok()?,
                    pages: p.parse().ok()?,
                    ticks: t.parse().ok()?,
                    at_ns,
                }),
                _ => None,
            }
        })
        .collect()
}

fn wait_reports(vm: &Vm, cpu: u64, n: u64) {
    let dev = vm.devices().expect("PVH devices");
    let t = std::time::Instant::now();
    while reports(&dev.capture())
        .iter()
        .filter(|r| r.cpu == cpu)
        .count()
        < n as usize
    {
        vm.vcpus().unwrap().check().expect("guest running");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "cpu {cpu} did not report {n} times:\n{}",
            String::from_utf8_lossy(&dev.serial_output())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Migrates `vm` to a new destination on this host; returns the destination VM and the
/// source's summary.
fn hop(vm: &mut Vm, dest_tracking: Tracking, opts: &SourceOptions) -> (Vm, MigrationSummary) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        receive(
            s,
            &DestOptions {
                tracking: dest_tracking,
                progress_timeout: Duration::from_secs(30),
                ..DestOptions::default()
            },
            &mut |_| {},
        )
    });
    let sum = migration_engine::migrate(vm, TcpStream::connect(addr).unwrap(), opts, &mut |_| {})
        .expect("migration");
    let (dest, isum) = h.join().unwrap().expect("destination");
    assert!(sum.completed(), "{}", sum.to_text());
    assert_eq!(sum.verified, Some(true), "memory digest: {}", sum.to_text());
    assert_eq!(isum.machine, "pvh");
    (dest, sum)
}

/// Checks the reports of one CPU across the hops: consecutive numbers, growing page counts,
/// the timer advancing (about `PERIOD_TICKS` ticks between reports),
/// and no gap across a migration longer than that migration's downtime plus `periods` report
/// periods. The report period is the nominal 40 ms or, if longer, the longest gap measured
/// between two reports on the same host (a report goes out at the first timer tick past its
/// TSC deadline, so it can be a tick late).
/// Returns (largest gap across a migration, report period), in ms.
fn check_continuity(
    all: &[Vec<Report>],
    cpu: u64,
    downtimes_ms: &[f64],
    periods: f64,
) -> (f64, f64) {
    let mut period_ms = REPORT_PERIOD_MS;
    for rs in all {
        let mine: Vec<&Report> = rs.iter().filter(|r| r.cpu == cpu).collect();
        for w in mine.windows(2) {
            period_ms = period_ms.max(w[1].at_ns.saturating_sub(w[0].at_ns) as f64 / 1e6);
        }
    }
    let mut prev: Option<Report> = None;
    let mut worst_cross = 0.0f64;
    for (hop, rs) in all.iter().enumerate() {
        let mine: Vec<&Report> = rs.iter().filter(|r| r.cpu == cpu).collect();
        assert!(
            mine.len() >= 2,
            "cpu {cpu} reported {} times on host {hop}",
            mine.len()
        );
        for (i, r) in mine.iter().enumerate() {
            if let Some(p) = prev {
                assert_eq!(
                    r.report,
                    p.report + 1,
                    "cpu {cpu} host {hop}: {p:?} -> {r:?}"
                );
                assert!(r.pages > p.pages, "cpu {cpu}: pages {p:?} -> {r:?}");
                // The timer keeps firing on every host: about PERIOD_TICKS ticks per report,
                // but a busy host coalesces ticks, so only that it fires is asserted.
                assert!(
                    r.ticks > p.ticks,
                    "cpu {cpu}: the timer stopped? {p:?} -> {r:?}"
                );
                let gap_ms = r.at_ns.saturating_sub(p.at_ns) as f64 / 1e6;
                if i == 0 {
                    // The first report on a new host: the migration lies in between.
                    let allowed = downtimes_ms[hop - 1] + periods * period_ms;
                    eprintln!(
                        "cpu {cpu} hop {hop}: gap {gap_ms:.1} ms across a downtime of {:.1} ms; report period {period_ms:.1} ms (nominal {REPORT_PERIOD_MS}); allowed {allowed:.1} ms",
                        downtimes_ms[hop - 1]
                    );
                    assert!(
                        gap_ms <= allowed,
                        "cpu {cpu}: {gap_ms:.1} ms without a report across migration {hop} (downtime {:.1} ms + {periods} x report period {period_ms:.1} ms): {p:?} -> {r:?}",
                        downtimes_ms[hop - 1]
                    );
                    worst_cross = worst_cross.max(gap_ms);
                }
            }
            prev = Some(**r);
        }
    }
    (worst_cross, period_ms)
}

/// Joins the console of each host: the source's capture, then each destination's. A line cut
/// by the pause is completed on the next host, so the joined text parses as one console.
fn joined_reports(caps: &[vmm::Capture]) -> Vec<Vec<Report>> {
    let mut out = Vec::new();
    let mut carry = Vec::new();
    for c in caps {
        let mut bytes = std::mem::take(&mut carry);
        let offset = bytes.len();
        bytes.extend_from_slice(&c.bytes);
        let mut line_ends: Vec<(usize, u64)> =
            c.line_ends.iter().map(|&(o, t)| (o + offset, t)).collect();
        let done = line_ends.last().map(|&(o, _)| o + 1).unwrap_or(0);
        carry = bytes[done..].to_vec();
        bytes.truncate(done);
        line_ends.retain(|&(o, _)| o < done);
        out.push(reports(&vmm::Capture { bytes, line_ends }));
    }
    out
}

fn power_off(mut vm: Vm) -> ExitStatus {
    let input = SerialInput::of(vm.devices().unwrap().clone());
    assert_eq!(input.send(&[POWER_OFF_KEY]), 1);
    pvh::wait_exit(&mut vm, Some(Duration::from_secs(30))).expect("wait")
}

#[test]
fn pvh_guest_migrates_with_the_ring_while_dirtying_and_its_console_and_timer_continue() {
    if !have_kvm() {
        return;
    }
    let _one_at_a_time = serial();
    let mut src = boot(Tracking::Ring { entries: 4096 }, 2);
    wait_reports(src.vm(), 1, 12);
    let opts = SourceOptions {
        downtime_limit: Duration::from_millis(50),
        ..SourceOptions::default()
    };
    let (dest, sum) = hop(src.vm_mut(), Tracking::Ring { entries: 4096 }, &opts);
    eprintln!("{}", sum.to_text());
    // The guest dirtied memory during the migration: more than one pass.
    assert!(sum.iterations.len() >= 2, "{}", sum.to_text());
    // The destination keeps reporting for at least 12 more periods on each CPU.
    for c in 0..2u64 {
        let before = reports(&dest.devices().unwrap().capture())
            .iter()
            .filter(|r| r.cpu == c)
            .count();
        wait_reports(&dest, c, before as u64 + 12);
    }
    let caps = vec![src.serial_capture(), dest.devices().unwrap().capture()];
    let all = joined_reports(&caps);
    for cpu in 0..2 {
        check_continuity(&all, cpu, &[sum.downtime_ms], 1.0);
    }
    // And it powers off on request, on the destination, with its status.
    assert_eq!(power_off(dest), ExitStatus::PowerOff(0x2a));
    // The source is stopped for good: it printed nothing after the pause.
    let later = src.serial_capture();
    assert_eq!(later.bytes.len(), caps[0].bytes.len());
}

#[test]
fn pvh_guest_ping_pongs_four_times_between_trackers_without_divergence() {
    if !have_kvm() {
        return;
    }
    let _one_at_a_time = serial();
    let mut src = boot(Tracking::Ring { entries: 4096 }, 2);
    wait_reports(src.vm(), 1, 3);
    let opts = SourceOptions {
        downtime_limit: Duration::from_millis(50),
        ..SourceOptions::default()
    };
    let mut caps = Vec::new();
    let mut downtimes = Vec::new();
    // ring -> bitmap -> ring -> clear-log -> ring: each destination is the next source.
    let trackers = [
        Tracking::Bitmap,
        Tracking::Ring { entries: 4096 },
        Tracking::ClearLog,
        Tracking::Ring { entries: 4096 },
    ];
    let (mut cur, sum) = hop(src.vm_mut(), trackers[0], &opts);
    caps.push(src.serial_capture());
    downtimes.push(sum.downtime_ms);
    // Earlier hosts' VMs stay until the end: tearing a VM down (unmapping its RAM, KVM
    // freeing its MMU) right after a hop would stall this process's next guest, which shares
    // the address space here as it would not across real hosts.
    let mut retired: Vec<Vm> = Vec::new();
    for t in &trackers[1..] {
        let n = reports(&cur.devices().unwrap().capture()).len();
        // Progress on this host before moving on (2 CPUs, 3 reports each).
        let tt = std::time::Instant::now();
        while reports(&cur.devices().unwrap().capture()).len() < n + 6 {
            cur.vcpus().unwrap().check().expect("guest running");
            assert!(tt.elapsed() < Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis(5));
        }
        let (next, sum) = hop(&mut cur, *t, &opts);
        eprintln!("hop to {t:?}: {}", sum.to_text());
        caps.push(cur.devices().unwrap().capture());
        downtimes.push(sum.downtime_ms);
        retired.push(std::mem::replace(&mut cur, next));
    }
    for c in 0..2 {
        let n = reports(&cur.devices().unwrap().capture())
            .iter()
            .filter(|r| r.cpu == c)
            .count();
        wait_reports(&cur, c, n as u64 + 3);
    }
    caps.push(cur.devices().unwrap().capture());
    let all = joined_reports(&caps);
    for cpu in 0..2 {
        // Four hops in one process on 2 cores: each destination guest warms up (KVM rebuilds
        // its shadow page tables on PVM) while the previous source verifies its digest, so
        // this test bounds the gap by two report periods; the single-hop test above holds
        // the one-period bound.
        let (worst, period) = check_continuity(&all, cpu, &downtimes, 2.0);
        eprintln!("cpu {cpu}: worst gap across a migration {worst:.1} ms (report period {period:.1} ms); downtimes {downtimes:?}");
    }
    assert_eq!(power_off(cur), ExitStatus::PowerOff(0x2a));
}
