//! `ringvisor bench migrate` and `ringvisor bench dirtylimit`: the migration matrix (memory x
//! dirty rate x hot set x tracker) and QEMU's dirty-limit table shape, each cell a real source
//! process and a real destination process (the `ringvisor` binary passed in), on loopback or
//! across two network namespaces joined by a tc-shaped veth pair (`scripts/netns.sh`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;

use crate::error::{error_chain, BenchError, Result};
use crate::plot::{line_plot_log_x, Series};
use crate::procs::{check_link, Endpoint};
use crate::procs::{endpoints, netns_down, reap_destination, source_summary, spawn_destination};
use crate::Progress;

/// The trackers a cell may use.
pub const TRACKERS: [&str; 3] = ["ring", "bitmap", "clear-log"];

/// Options of the migration matrix.
#[derive(Debug, Clone)]
pub struct MigrateOpts {
    /// The `ringvisor` binary (run as `incoming` and `run`).
    pub exe: PathBuf,
    /// Guest memory sizes in GiB.
    pub memory_gib: Vec<u64>,
    /// Guest dirty rates in MB/s (10^6 bytes).
    pub rates_mb: Vec<u64>,
    /// Written sets: `all` or a hot-set size such as `256M`.
    pub sets: Vec<String>,
    /// Trackers (`ring`, `bitmap`, `clear-log`).
    pub trackers: Vec<String>,
    /// Dirty ring entries per vCPU.
    pub ring_entries: u32,
    /// vCPUs of the guest.
    pub vcpus: u64,
    /// `loopback` or a tc rate such as `1gbit`.
    pub link: String,
    /// Seconds before a migration is aborted.
    pub timeout: f64,
    /// `downtime-limit` in ms.
    pub downtime_limit: u64,
    /// Write an SVG plot here.
    pub plot: Option<PathBuf>,
    /// `--max-bandwidth` passed to the source as given.
    pub max_bandwidth: Option<String>,
    /// `--dirty-limit` passed to the source as given.
    pub dirty_limit: Option<String>,
    /// `--auto-converge` on the source.
    pub auto_converge: bool,
    /// Run every cell twice, plain TCP then TLS 1.3 (fresh credentials written for the run),
    /// and report the TLS cost as a ratio to plain in a second table.
    pub tls: bool,
}

/// One migration of the matrix, from the source's JSON summary.
#[derive(Serialize, Clone, Debug)]
pub struct Row {
    /// Guest memory (GiB).
    pub memory_gib: u64,
    /// Guest dirty rate (MB/s).
    pub dirty_rate_mb_s: u64,
    /// Written set (`all` or a size).
    pub hot_set: String,
    /// Tracker.
    pub tracker: String,
    /// The migration completed.
    pub converged: bool,
    /// The outcome's kind (`completed`, `aborted`, ...).
    pub outcome: String,
    /// Total migration time (s).
    pub total_s: f64,
    /// Downtime (ms).
    pub downtime_ms: f64,
    /// MiB sent.
    pub mib_sent: f64,
    /// Passes.
    pub passes: usize,
    /// The memory digests matched (None: not compared).
    pub verified: Option<bool>,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits.
    pub ring_full_exits: u64,
    /// Dirty-limit / auto-converge events.
    pub dirty_limit_events: u64,
    /// Guest progress (writes/s per vCPU) in the second before the migration.
    pub progress_before: Vec<f64>,
    /// Guest progress (writes/s per vCPU) during the migration.
    pub progress_during: Vec<f64>,
    /// The stream ran over TLS 1.3.
    pub tls: bool,
    /// Where the CPU went over the migration (from the two processes' summaries).
    pub cpu: CellCpu,
    /// The frames carried CRC-32Cs (`None`: not reported).
    pub frame_crc: Option<bool>,
}

/// CPU seconds per thread over one migration: the source's migration thread and vCPU
/// threads from its start to the destination's resume, the destination's receive thread
/// from its first byte to the resume, and the host's idle CPU-seconds over the source's
/// span (all CPUs; 10 ms ticks). `None`: not reported (an older binary, or no summary).
#[derive(Serialize, Clone, Debug, Default)]
pub struct CellCpu {
    /// Wall-clock seconds the source's figures cover.
    pub wall_s: Option<f64>,
    /// The source's migration thread.
    pub source_thread_s: Option<f64>,
    /// The destination's receive thread.
    pub dest_thread_s: Option<f64>,
    /// The source's vCPU threads, per vCPU.
    pub vcpu_s: Vec<f64>,
    /// The host's CPUs.
    pub host_cpus: Option<u64>,
    /// Idle CPU-seconds of the host over the source's span.
    pub host_idle_s: Option<f64>,
    /// CPU-seconds the hypervisor gave to other guests over the span.
    pub host_steal_s: Option<f64>,
}

impl CellCpu {
    fn from_summaries(src: &serde_json::Value, dst: &serde_json::Value) -> CellCpu {
        let (s, d) = (&src["cpu"], &dst["cpu"]);
        CellCpu {
            wall_s: s["wall_s"].as_f64(),
            source_thread_s: s["thread_s"].as_f64(),
            dest_thread_s: d["thread_s"].as_f64(),
            vcpu_s: floats(&s["vcpu_s"]),
            host_cpus: s["host_cpus"].as_u64(),
            host_idle_s: s["host_idle_s"].as_f64(),
            host_steal_s: s["host_steal_s"].as_f64(),
        }
    }

    /// The vCPU threads together.
    pub fn vcpus_s(&self) -> f64 {
        self.vcpu_s.iter().sum()
    }
}

impl Row {
    /// Throughput of the whole migration (MiB sent / total time), MiB/s.
    pub fn mib_per_s(&self) -> f64 {
        if self.total_s > 0.0 {
            self.mib_sent / self.total_s
        } else {
            0.0
        }
    }
}

/// The migration matrix.
#[derive(Serialize, Debug)]
pub struct Report {
    /// `loopback` or the tc rate.
    pub link: String,
    /// The extra parameters, rendered (` | max-bandwidth 1G ...`).
    pub extra: String,
    /// The host's KVM is PVM.
    pub pvm_host: bool,
    /// vCPUs per guest.
    pub vcpus: u64,
    /// Ring entries per vCPU.
    pub ring_entries: u32,
    /// Timeout (s).
    pub timeout_s: f64,
    /// `downtime-limit` (ms).
    pub downtime_limit_ms: u64,
    /// One row per migration that produced a summary.
    pub rows: Vec<Row>,
    /// The trackers, in the table's column order.
    #[serde(skip)]
    pub trackers: Vec<String>,
}

/// Checks a tracker list.
pub fn check_trackers(trackers: &[String]) -> Result<()> {
    match trackers.iter().find(|t| !TRACKERS.contains(&t.as_str())) {
        Some(t) => Err(BenchError::Invalid(format!(
            "--trackers: unknown tracker {t:?} (ring, bitmap, clear-log)"
        ))),
        None => Ok(()),
    }
}

/// One cell of the matrix.
struct Cell<'a> {
    mem: u64,
    rate: u64,
    set: &'a str,
    tracker: &'a str,
    /// Extra `ringvisor run` arguments (beyond the matrix-wide ones).
    extra: Vec<String>,
    /// `--tls-creds` of both processes (`None`: plain TCP).
    tls: Option<&'a Path>,
}

/// The source's arguments beyond the cell's own. Each throttle goes to the trackers that
/// have it (`ringvisor run` refuses the others as a usage error): the dirty limit to the
/// ring, auto-converge to the bitmap trackers.
fn matrix_extra(o: &MigrateOpts, tracker: &str) -> Vec<String> {
    let mut extra: Vec<String> = Vec::new();
    if let Some(b) = &o.max_bandwidth {
        extra.extend(["--max-bandwidth".into(), b.clone()]);
    }
    match &o.dirty_limit {
        Some(d) if tracker == "ring" => extra.extend(["--dirty-limit".into(), d.clone()]),
        _ => {}
    }
    // With a dirty limit too, the ring gets the dirty limit (the two exclude each other).
    if o.auto_converge && (tracker != "ring" || o.dirty_limit.is_none()) {
        extra.push("--auto-converge".into());
    }
    extra
}

fn one(o: &MigrateOpts, src: &Endpoint, dst: &Endpoint, c: Cell<'_>) -> Result<Row> {
    let Cell {
        mem,
        rate,
        set,
        tracker,
        extra: cell_extra,
        tls,
    } = c;
    let tls_args: Vec<&std::ffi::OsStr> = tls
        .iter()
        .flat_map(|d| [std::ffi::OsStr::new("--tls-creds"), d.as_os_str()])
        .collect();
    let mut cmd = dst.command(&o.exe);
    cmd.args([
        "incoming",
        "--listen",
        &format!("{}:0", dst.ip),
        "--duration",
        "0.3",
        "--json",
        "--tracker",
        tracker,
        "--ring-entries",
        &o.ring_entries.to_string(),
    ]);
    cmd.args(&tls_args);
    let mut dest = spawn_destination(cmd)?;
    let set_bytes = if set == "all" {
        format!("{mem}G")
    } else {
        set.to_string()
    };
    let mut extra = matrix_extra(o, tracker);
    extra.extend(cell_extra);
    tracing::debug!(mem, rate, set, tracker, addr = %dest.addr, "starting the source");
    let out = src
        .command(&o.exe)
        .args([
            "run",
            "--memory",
            &format!("{mem}G"),
            "--vcpus",
            &o.vcpus.to_string(),
            "--dirty-rate",
            &(rate * 1_000_000).to_string(),
            "--working-set",
            &set_bytes,
            "--tracker",
            tracker,
            "--ring-entries",
            &o.ring_entries.to_string(),
            "--migrate-to",
            &dest.addr,
            "--migrate-after",
            "2",
            "--downtime-limit",
            &o.downtime_limit.to_string(),
            "--timeout",
            &o.timeout.to_string(),
            "--on-timeout",
            "abort",
            "--exit-after-migrate",
            "--json",
        ])
        .args(&extra)
        .args(&tls_args)
        .stderr(Stdio::piped())
        .output()
        .map_err(BenchError::io("running the source"));
    let dest_out = reap_destination(&mut dest);
    let v = source_summary(&out?)?;
    // `incoming --json` prints its summary as one line once the guest resumed.
    let dv: serde_json::Value = dest_out
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .unwrap_or_default();
    let kind = v["outcome"]["kind"].as_str().unwrap_or("?").to_string();
    Ok(Row {
        memory_gib: mem,
        dirty_rate_mb_s: rate,
        hot_set: set.to_string(),
        tracker: tracker.to_string(),
        converged: kind == "completed",
        outcome: kind,
        total_s: v["total_ms"].as_f64().unwrap_or(0.0) / 1e3,
        downtime_ms: v["downtime_ms"].as_f64().unwrap_or(0.0),
        mib_sent: v["bytes_sent"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        passes: v["iterations"].as_array().map(|a| a.len()).unwrap_or(0),
        verified: v["verified"].as_bool(),
        ring_full_exits: v["ring_full_exits"].as_u64().unwrap_or(0),
        dirty_limit_events: v["dirty_limit_events"].as_u64().unwrap_or(0),
        progress_before: floats(&v["progress_before"]),
        progress_during: floats(&v["progress_during"]),
        tls: tls.is_some(),
        cpu: CellCpu::from_summaries(&v, &dv),
        frame_crc: v["frame_crc"].as_bool(),
    })
}

/// Fresh credentials for a `--tls` run, valid for the destination's address; removed on
/// drop.
struct BenchCreds(PathBuf);

impl BenchCreds {
    fn new(dst: &Endpoint) -> Result<BenchCreds> {
        let dir = std::env::temp_dir().join(format!("ringvisor-bench-tls-{}", std::process::id()));
        let mut opts = tls::GenerateOptions {
            force: true,
            ..tls::GenerateOptions::default()
        };
        if !opts.server_names.iter().any(|n| n == dst.ip) {
            opts.server_names.push(dst.ip.to_string());
        }
        tls::generate(&dir, &opts).map_err(BenchError::Tls)?;
        Ok(BenchCreds(dir))
    }
}

impl Drop for BenchCreds {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default()
}

/// Runs the matrix. A cell that fails is reported through `progress.note` and left out; a
/// digest mismatch is noted and kept.
pub fn run(o: &MigrateOpts, progress: &mut dyn Progress) -> Result<Report> {
    if !vmm::kvm_available() {
        return Err(BenchError::NoKvm("bench migrate"));
    }
    check_trackers(&o.trackers)?;
    check_link(&o.link)?;
    let (src, dst) = endpoints(&o.link)?;
    let creds = o.tls.then(|| BenchCreds::new(&dst)).transpose()?;
    // Plain, then (with --tls) the same cell over TLS right after it.
    let modes: Vec<Option<&Path>> = std::iter::once(None)
        .chain(creds.as_ref().map(|c| Some(c.0.as_path())))
        .collect();
    let total = o.memory_gib.len() * o.rates_mb.len() * o.sets.len() * o.trackers.len();
    progress.start((total * modes.len()) as u64, "migrations");
    let mut rows = Vec::new();
    for &mem in &o.memory_gib {
        for &rate in &o.rates_mb {
            for set in &o.sets {
                for (t, &tls) in o
                    .trackers
                    .iter()
                    .flat_map(|t| modes.iter().map(move |m| (t, m)))
                {
                    let chan = if tls.is_some() { "TLS" } else { "plain" };
                    progress.step(&format!("{mem} GiB, {rate} MB/s, {set}, {t}, {chan}"));
                    let cell = Cell {
                        mem,
                        rate,
                        set,
                        tracker: t,
                        extra: Vec::new(),
                        tls,
                    };
                    let r = match one(o, &src, &dst, cell) {
                        Ok(r) => r,
                        Err(e) => {
                            progress.note(&format!(
                                "{mem} GiB {rate} MB/s {set} {t} {chan}: {}",
                                error_chain(&e)
                            ));
                            continue;
                        }
                    };
                    if r.verified == Some(false) {
                        progress.note(&format!("WARNING: memory digest mismatch in {r:?}"));
                    }
                    rows.push(r);
                    progress.inc();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    progress.finish();
    netns_down(&o.link);
    let rep = Report {
        extra: format!(
            "{}{}{}",
            o.max_bandwidth
                .as_ref()
                .map(|b| format!(" | max-bandwidth {b}"))
                .unwrap_or_default(),
            o.dirty_limit
                .as_ref()
                .map(|d| format!(" | dirty-limit {d}"))
                .unwrap_or_default(),
            if o.auto_converge {
                " | auto-converge"
            } else {
                ""
            }
        ),
        link: o.link.clone(),
        pvm_host: kvm_dirty::is_pvm_host(),
        vcpus: o.vcpus,
        ring_entries: o.ring_entries,
        timeout_s: o.timeout,
        downtime_limit_ms: o.downtime_limit,
        rows,
        trackers: o.trackers.clone(),
    };
    if let Some(p) = &o.plot {
        plot(&rep, p)?;
    }
    Ok(rep)
}

/// Options of the dirty-limit table: for each dirty rate, a guest whose vCPU 0 dirties memory
/// continuously while vCPU 1 only computes is migrated over the link with (a) the ring and
/// `--dirty-limit auto`, (b) the bitmap and `--auto-converge`, (c) the ring without
/// throttling; the table has total time, downtime, convergence and how much the computing
/// vCPU was slowed.
#[derive(Debug, Clone)]
pub struct LimitOpts {
    /// The `ringvisor` binary.
    pub exe: PathBuf,
    /// Dirty rates of vCPU 0 in MB/s.
    pub rates_mb: Vec<u64>,
    /// Guest memory in GiB.
    pub memory_gib: u64,
    /// `loopback` or a tc rate.
    pub link: String,
    /// Seconds before a non-converging migration is aborted.
    pub timeout: f64,
    /// Write an SVG plot here.
    pub plot: Option<PathBuf>,
}

/// One migration of the dirty-limit table.
#[derive(Serialize, Debug)]
pub struct LimitRow {
    /// `dirty-limit`, `auto-converge` or `none`.
    pub method: String,
    /// The migration.
    pub row: Row,
    /// 1 - (progress of the computing vCPU during the migration / before), in percent.
    pub compute_vcpu_slowdown_pct: Option<f64>,
}

/// The dirty-limit table.
#[derive(Debug)]
pub struct LimitReport {
    /// `loopback` or the tc rate.
    pub link: String,
    /// Guest memory (GiB).
    pub memory_gib: u64,
    /// Timeout (s).
    pub timeout_s: f64,
    /// The host's KVM is PVM.
    pub pvm_host: bool,
    /// One row per migration that produced a summary.
    pub rows: Vec<LimitRow>,
}

/// The methods of the dirty-limit table: name, tracker, source arguments.
const LIMIT_METHODS: [(&str, &str, &[&str]); 3] = [
    ("dirty-limit", "ring", &["--dirty-limit", "auto"]),
    ("auto-converge", "bitmap", &["--auto-converge"]),
    ("none", "ring", &[]),
];

/// Runs the dirty-limit table.
pub fn run_dirtylimit(o: &LimitOpts, progress: &mut dyn Progress) -> Result<LimitReport> {
    if !vmm::kvm_available() {
        return Err(BenchError::NoKvm("bench dirtylimit"));
    }
    check_link(&o.link)?;
    let (src, dst) = endpoints(&o.link)?;
    let mo = MigrateOpts {
        exe: o.exe.clone(),
        memory_gib: vec![o.memory_gib],
        rates_mb: o.rates_mb.clone(),
        sets: vec!["all".into()],
        trackers: vec![],
        ring_entries: 65536,
        vcpus: 2,
        link: o.link.clone(),
        timeout: o.timeout,
        downtime_limit: 300,
        plot: None,
        max_bandwidth: None,
        dirty_limit: None,
        auto_converge: false,
        tls: false,
    };
    progress.start(
        (o.rates_mb.len() * LIMIT_METHODS.len()) as u64,
        "migrations",
    );
    let mut rows = Vec::new();
    for &rate in &o.rates_mb {
        for (name, tracker, args) in LIMIT_METHODS {
            progress.step(&format!("{rate} MB/s {name}"));
            let mut extra: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            extra.extend(["--dirty-vcpus".into(), "1".into()]);
            let cell = Cell {
                mem: o.memory_gib,
                rate,
                set: "all",
                tracker,
                extra,
                tls: None,
            };
            match one(&mo, &src, &dst, cell) {
                Ok(r) => {
                    let slow = match (r.progress_before.get(1), r.progress_during.get(1)) {
                        (Some(&b), Some(&d)) if b > 0.0 => Some((1.0 - d / b) * 100.0),
                        _ => None,
                    };
                    rows.push(LimitRow {
                        method: name.to_string(),
                        row: r,
                        compute_vcpu_slowdown_pct: slow,
                    });
                }
                Err(e) => progress.note(&format!("{rate} MB/s {name}: {}", error_chain(&e))),
            }
            progress.inc();
        }
    }
    progress.finish();
    netns_down(&o.link);
    let rep = LimitReport {
        link: o.link.clone(),
        memory_gib: o.memory_gib,
        timeout_s: o.timeout,
        pvm_host: kvm_dirty::is_pvm_host(),
        rows,
    };
    if let Some(path) = &o.plot {
        rep.plot(path)?;
    }
    Ok(rep)
}

impl LimitReport {
    /// Total time per method versus dirty rate; a run that did not converge is drawn at the
    /// timeout.
    fn plot(&self, path: &Path) -> Result<()> {
        let series: Vec<Series> = LIMIT_METHODS
            .iter()
            .map(|(name, _, _)| Series {
                name: name.to_string(),
                points: self
                    .rows
                    .iter()
                    .filter(|r| r.method == *name)
                    .map(|r| {
                        let t = if r.row.converged {
                            r.row.total_s
                        } else {
                            self.timeout_s
                        };
                        (r.row.dirty_rate_mb_s as f64, t)
                    })
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if series.is_empty() {
            return Ok(());
        }
        line_plot_log_x(
            path,
            &format!(
                "migration time vs dirty rate ({}; {} s = did not converge)",
                self.link, self.timeout_s
            ),
            "dirty rate of vCPU 0 (MB/s)",
            "total migration time (s)",
            &series,
        )
    }

    /// The table as markdown, with its header line.
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "link {} | {} GiB guest, vCPU 0 dirties random pages over all memory, vCPU 1 only computes | timeout {} s | host KVM {}\n\n",
            self.link,
            self.memory_gib,
            self.timeout_s,
            if self.pvm_host { "PVM" } else { "not PVM" }
        );
        s.push_str("| dirty rate | method | converged | total ms | downtime ms | passes | throttle events | computing vCPU slowed |\n");
        s.push_str("|---|---|---|---|---|---|---|---|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} MB/s | {} ({}) | {} | {} | {} | {} | {} | {} |\n",
                r.row.dirty_rate_mb_s,
                r.method,
                r.row.tracker,
                if r.row.converged { "yes" } else { "no" },
                if r.row.converged {
                    format!("{:.0}", r.row.total_s * 1e3)
                } else {
                    format!("> {:.0} (timeout)", self.timeout_s * 1e3)
                },
                if r.row.converged {
                    format!("{:.0}", r.row.downtime_ms)
                } else {
                    "-".into()
                },
                r.row.passes,
                r.row.dirty_limit_events,
                r.compute_vcpu_slowdown_pct
                    .map(|p| format!("{p:.0}%"))
                    .unwrap_or_else(|| "-".into())
            ));
        }
        s
    }
}

impl Report {
    /// The matrix as markdown, with its header line.
    pub fn to_markdown(&self) -> String {
        markdown(self, &self.trackers)
    }
}

fn markdown(r: &Report, trackers: &[String]) -> String {
    let mut s = format!(
        "link: {}{} | {} vCPUs | ring {} entries | downtime-limit {} ms | timeout {} s (then abort) | host KVM {}\n\n",
        r.link,
        r.extra,
        r.vcpus,
        r.ring_entries,
        r.downtime_limit_ms,
        r.timeout_s,
        if r.pvm_host { "PVM" } else { "not PVM" }
    );
    s.push_str("| memory | dirty rate | written set |");
    for t in trackers {
        s.push_str(&format!(" {t}: total s / downtime ms / MiB / passes |"));
    }
    s.push_str(" ring vs bitmap total |\n|---|---|---|");
    for _ in trackers {
        s.push_str("---|");
    }
    s.push_str("---|\n");
    let mut keys: Vec<(u64, u64, String)> = r
        .rows
        .iter()
        .map(|x| (x.memory_gib, x.dirty_rate_mb_s, x.hot_set.clone()))
        .collect();
    keys.dedup();
    for (m, rate, set) in keys {
        s.push_str(&format!("| {m} GiB | {rate} MB/s | {set} |"));
        let find = |t: &str| {
            r.rows.iter().find(|x| {
                !x.tls
                    && x.memory_gib == m
                    && x.dirty_rate_mb_s == rate
                    && x.hot_set == set
                    && x.tracker == t
            })
        };
        for t in trackers {
            match find(t) {
                Some(x) if x.converged => s.push_str(&format!(
                    " {:.2} / {:.0} / {:.0} / {}{} |",
                    x.total_s,
                    x.downtime_ms,
                    x.mib_sent,
                    x.passes,
                    if x.verified == Some(false) {
                        " DIGEST MISMATCH"
                    } else {
                        ""
                    }
                )),
                Some(x) => s.push_str(&format!(
                    " not converged ({}) / - / {:.0} / {} |",
                    x.outcome, x.mib_sent, x.passes
                )),
                None => s.push_str(" - |"),
            }
        }
        match (find("ring"), find("bitmap")) {
            (Some(a), Some(b)) if a.converged && b.converged && b.total_s > 0.0 => {
                s.push_str(&format!(" {:.2}x |\n", a.total_s / b.total_s))
            }
            _ => s.push_str(" - |\n"),
        }
    }
    if r.rows.iter().any(|x| x.tls) {
        s.push_str(&tls_markdown(r));
        s.push_str(&cpu_markdown(r));
    }
    s
}

/// Per-thread CPU seconds of each migration (plain and TLS rows of a cell together), and
/// the host's idle CPU-seconds over it: CPU on top of a saturated host (idle near 0), or
/// waiting (idle left over)?
fn cpu_markdown(r: &Report) -> String {
    let mut s = String::from(
        "\nCPU seconds per thread over each migration (source: start to resume; destination: first byte to resume), \
         and the host's idle CPU-seconds over the source's span (all CPUs, 10 ms ticks):\n\n\
         | memory | dirty rate | tracker | channel | frame CRC | total s | MiB | source migration thread | destination receive thread | source ms/MiB | destination ms/MiB | vCPU threads | host idle | host steal | idle share |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    for x in &r.rows {
        // CPU per MiB moved: what a thread costs per unit of work, whatever the number of
        // passes the noise of a shared host made the cell take.
        let per_mib = |cpu: Option<f64>| match cpu {
            Some(c) if x.mib_sent >= 1.0 => format!("{:.2}", c * 1e3 / x.mib_sent),
            _ => "-".to_string(),
        };
        let c = &x.cpu;
        let share = match (c.host_idle_s, c.wall_s, c.host_cpus) {
            (Some(i), Some(w), Some(n)) if w > 0.0 && n > 0 => {
                format!("{:.0}%", 100.0 * i / (w * n as f64))
            }
            _ => "-".into(),
        };
        s.push_str(&format!(
            "| {} GiB | {} MB/s | {} | {} | {} | {:.3} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            x.memory_gib,
            x.dirty_rate_mb_s,
            x.tracker,
            if x.tls { "TLS" } else { "plain" },
            match x.frame_crc {
                Some(true) => "on",
                Some(false) => "off",
                None => "-",
            },
            x.total_s,
            x.mib_sent,
            f(c.source_thread_s),
            f(c.dest_thread_s),
            per_mib(c.source_thread_s),
            per_mib(c.dest_thread_s),
            if c.vcpu_s.is_empty() {
                "-".to_string()
            } else {
                format!("{:.3}", c.vcpus_s())
            },
            f(c.host_idle_s),
            f(c.host_steal_s),
            share,
        ));
    }
    s
}

/// The TLS cost table: each cell's plain and TLS runs side by side, with the ratio of
/// total migration time (TLS / plain) and the throughput of each.
fn tls_markdown(r: &Report) -> String {
    let mut s = String::from(
        "\nTLS 1.3 (rustls, ring; mutual x509) versus plain TCP, the same cell run back to back:\n\n\
         | memory | dirty rate | written set | tracker | plain total s | TLS total s | TLS / plain time | plain MiB/s | TLS MiB/s | TLS downtime ms |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for t in r.rows.iter().filter(|x| x.tls) {
        let Some(p) = r.rows.iter().find(|x| {
            !x.tls
                && x.memory_gib == t.memory_gib
                && x.dirty_rate_mb_s == t.dirty_rate_mb_s
                && x.hot_set == t.hot_set
                && x.tracker == t.tracker
        }) else {
            continue;
        };
        let both = p.converged && t.converged && p.total_s > 0.0;
        s.push_str(&format!(
            "| {} GiB | {} MB/s | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} |\n",
            t.memory_gib,
            t.dirty_rate_mb_s,
            t.hot_set,
            t.tracker,
            if p.converged {
                format!("{:.2}", p.total_s)
            } else {
                format!("not converged ({})", p.outcome)
            },
            if t.converged {
                format!("{:.2}", t.total_s)
            } else {
                format!("not converged ({})", t.outcome)
            },
            if both {
                format!("{:.2}x", t.total_s / p.total_s)
            } else {
                "-".into()
            },
            p.mib_per_s(),
            t.mib_per_s(),
            if t.converged {
                format!("{:.0}", t.downtime_ms)
            } else {
                "-".into()
            },
        ));
    }
    s
}

fn plot(r: &Report, path: &Path) -> Result<()> {
    // Total time versus dirty rate, hot-set runs on the largest memory size, one line per tracker.
    let mem = r.rows.iter().map(|x| x.memory_gib).max().unwrap_or(1);
    let mut series = Vec::new();
    for t in ["ring", "bitmap", "clear-log"] {
        let pts: Vec<(f64, f64)> = r
            .rows
            .iter()
            .filter(|x| x.tracker == t && x.memory_gib == mem && x.hot_set != "all" && x.converged)
            .map(|x| ((x.dirty_rate_mb_s.max(1)) as f64, x.total_s))
            .collect();
        if !pts.is_empty() {
            series.push(Series {
                name: t.to_string(),
                points: pts,
            });
        }
    }
    if series.is_empty() {
        return Ok(());
    }
    line_plot_log_x(
        path,
        &format!("migration time, {mem} GiB guest, hot set ({})", r.link),
        "guest dirty rate (MB/s; 0 plotted at 1)",
        "total migration time (s)",
        &series,
    )
}
