//! Live migration of PVH guests (the project's PVH test kernel: ring-3 dirtying, LAPIC timer,
//! two vCPUs started by INIT/SIPI, console on COM1) on real KVM over real TCP (loopback).
//! Each test prints `SKIP(kvm)` without `/dev/kvm`; `.ci/run` rejects skips on a machine that
//! has it.

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use migration_engine::{receive, DestOptions, MigrationSummary, SourceOptions, TimeoutAction};
use pvh::test_kernel::{self, Cmdline, TestKernelParams, POWER_OFF_KEY};
use pvh::{ExitStatus, PvhConfig, SerialInput};
use vmm::{Tracking, Vm};

/// Each test here runs two or more 2-vCPU guests on a 2-core host: they run one at a time,
/// whatever the test harness's thread count.
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
/// 40 ticks, each CPU dirtying 1 MiB per report (2 CPUs: 50 MiB/s). The tests check what
/// the guest did (its reports, its tick counts, its memory), not when: on a busy host a vCPU
/// thread may wait for a core for any length of time. The gap in the reports across a
/// migration is printed for the reader, not checked; measuring the downtime is
/// `ringvisor bench migrate --pvh`'s job.
const TICK_US: u64 = 1000;
const PERIOD_TICKS: u64 = 40;

/// Liveness bound of every wait here: only a hung guest takes this long.
const PATIENCE: Duration = Duration::from_secs(60);

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

/// The migrations here: a 50 ms `downtime-limit`, and a forced switchover if pre-copy has
/// not converged after [`FORCE_AFTER`]. The migration threads run at a lower priority than
/// the vCPUs (so the guest keeps its timer while it is migrated): on a busy host they may
/// send slower than the guest dirties (50 MiB/s), and pre-copy alone would then never end.
/// Converged or forced is the policy's decision (printed); what is checked is what the guest
/// sees either way.
fn options() -> SourceOptions {
    SourceOptions {
        downtime_limit: Duration::from_millis(50),
        timeout: Some(FORCE_AFTER),
        on_timeout: TimeoutAction::ForceSwitchover,
        ..SourceOptions::default()
    }
}

/// See [`options`].
const FORCE_AFTER: Duration = Duration::from_secs(15);

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
            let p = pvh::test_kernel::Progress::parse(&l)?;
            Some(Report {
                cpu: p.cpu,
                report: p.report,
                pages: p.pages,
                ticks: p.ticks,
                at_ns,
            })
        })
        .collect()
}

/// Waits until `cpu` has printed `more` progress reports on `vm` beyond the `seen` it had
/// printed there, and its timer has ticked on this host: its last report here shows more
/// ticks than its first report here. (A report goes out once the guest's TSC passes its
/// deadline; a guest that fell behind catches up with reports between two ticks, so a tick
/// between two given reports is not guaranteed, only ticks over time while the timer fires.)
fn wait_progress(vm: &Vm, cpu: u64, seen: usize, more: usize) {
    let dev = vm.devices().expect("PVH devices");
    let t = std::time::Instant::now();
    loop {
        let mine: Vec<Report> = reports(&dev.capture())
            .into_iter()
            .filter(|r| r.cpu == cpu)
            .collect();
        let ticked = matches!((mine.first(), mine.last()), (Some(a), Some(b)) if b.ticks > a.ticks);
        if mine.len() >= seen + more && ticked {
            return;
        }
        vm.vcpus().unwrap().check().expect("guest running");
        assert!(
            t.elapsed() < PATIENCE,
            "cpu {cpu}: {} reports here (waiting for {}), timer ticked here: {ticked}:\n{}",
            mine.len(),
            seen + more,
            String::from_utf8_lossy(&dev.serial_output())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Progress reports `cpu` has printed on `vm` so far.
fn reports_of(vm: &Vm, cpu: u64) -> usize {
    reports(&vm.devices().expect("PVH devices").capture())
        .iter()
        .filter(|r| r.cpu == cpu)
        .count()
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

/// Checks the reports of one CPU across the hosts (source first, then each destination):
/// on every host the CPU reported at least twice and its timer ticked (more ticks at its last
/// report there than at its first); report numbers run on without a gap or a repeat across
/// every migration; its page count grows with every report; its tick count never goes back.
/// Prints the wall-clock gap across each migration next to that migration's downtime (for
/// the reader: a busy host stretches it arbitrarily; the benchmark measures it).
fn check_continuity(all: &[Vec<Report>], cpu: u64, downtimes_ms: &[f64]) {
    let mut prev: Option<Report> = None;
    for (host, rs) in all.iter().enumerate() {
        let mine: Vec<&Report> = rs.iter().filter(|r| r.cpu == cpu).collect();
        assert!(
            mine.len() >= 2,
            "cpu {cpu} reported {} times on host {host}",
            mine.len()
        );
        let (first, last) = (mine[0], mine[mine.len() - 1]);
        assert!(
            last.ticks > first.ticks,
            "cpu {cpu}: the timer did not tick on host {host}: {first:?} .. {last:?}"
        );
        for (i, r) in mine.iter().enumerate() {
            if let Some(p) = prev {
                assert_eq!(
                    r.report,
                    p.report + 1,
                    "cpu {cpu} host {host}: a report lost or repeated: {p:?} -> {r:?}"
                );
                assert!(r.pages > p.pages, "cpu {cpu}: pages {p:?} -> {r:?}");
                // Ticks never go back. They need not advance between two reports: reports
                // are paced by the TSC (`pace=1`), so a guest that fell behind (a busy host,
                // or just after a migration) reports back to back to catch up, and a busy
                // host coalesces ticks. That the timer fires on every host is asserted above
                // (more ticks at its last report there than at its first).
                assert!(
                    r.ticks >= p.ticks,
                    "cpu {cpu}: the tick count went back: {p:?} -> {r:?}"
                );
                if i == 0 {
                    eprintln!(
                        "cpu {cpu} migration {host}: {:.1} ms between the last report on the source and the first on the destination (downtime {:.1} ms, report period {} ms)",
                        r.at_ns.saturating_sub(p.at_ns) as f64 / 1e6,
                        downtimes_ms[host - 1],
                        TICK_US * PERIOD_TICKS / 1000
                    );
                }
            }
            prev = Some(**r);
        }
    }
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
    pvh::wait_exit(&mut vm, Some(PATIENCE)).expect("wait")
}

#[test]
fn pvh_guest_migrates_with_the_ring_while_dirtying_and_its_console_and_timer_continue() {
    if !have_kvm() {
        return;
    }
    let _one_at_a_time = serial();
    let mut src = boot(Tracking::Ring { entries: 4096 }, 2);
    for c in 0..2u64 {
        wait_progress(src.vm(), c, 0, 12);
    }
    let opts = options();
    let (dest, sum) = hop(src.vm_mut(), Tracking::Ring { entries: 4096 }, &opts);
    eprintln!("{}", sum.to_text());
    // The destination keeps reporting, 12 more reports on each CPU, and its timer ticks there.
    for c in 0..2u64 {
        wait_progress(&dest, c, reports_of(&dest, c), 12);
    }
    let caps = vec![src.serial_capture(), dest.devices().unwrap().capture()];
    let all = joined_reports(&caps);
    for cpu in 0..2 {
        check_continuity(&all, cpu, &[sum.downtime_ms]);
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
    for c in 0..2u64 {
        wait_progress(src.vm(), c, 0, 3);
    }
    let opts = options();
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
        // Progress on this host before moving on: 3 reports on each CPU, its timer ticking.
        for c in 0..2u64 {
            wait_progress(&cur, c, reports_of(&cur, c), 3);
        }
        let (next, sum) = hop(&mut cur, *t, &opts);
        eprintln!("hop to {t:?}: {}", sum.to_text());
        caps.push(cur.devices().unwrap().capture());
        downtimes.push(sum.downtime_ms);
        retired.push(std::mem::replace(&mut cur, next));
    }
    for c in 0..2u64 {
        wait_progress(&cur, c, reports_of(&cur, c), 3);
    }
    caps.push(cur.devices().unwrap().capture());
    let all = joined_reports(&caps);
    for cpu in 0..2 {
        check_continuity(&all, cpu, &downtimes);
    }
    assert_eq!(power_off(cur), ExitStatus::PowerOff(0x2a));
}
