//! `ringvisor bench migrate`: the migration matrix (memory x dirty rate x hot set x tracker),
//! each run a real source process and a real destination process, on loopback or across two
//! network namespaces joined by a tc-shaped veth pair (`scripts/netns.sh`).

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::plot::{line_plot_log_x, Series};

pub struct Opts {
    pub memory_gib: Vec<u64>,
    pub rates_mb: Vec<u64>,
    pub sets: Vec<String>,
    pub trackers: Vec<String>,
    pub ring_entries: u32,
    pub vcpus: u64,
    pub link: String,
    pub timeout: f64,
    pub downtime_limit: u64,
    pub plot: Option<std::path::PathBuf>,
    pub max_bandwidth: Option<String>,
    pub dirty_limit: Option<String>,
    pub auto_converge: bool,
    pub json: bool,
}

#[derive(Serialize, Clone, Debug)]
pub struct Row {
    pub memory_gib: u64,
    pub dirty_rate_mb_s: u64,
    pub hot_set: String,
    pub tracker: String,
    pub converged: bool,
    pub outcome: String,
    pub total_s: f64,
    pub downtime_ms: f64,
    pub mib_sent: f64,
    pub passes: usize,
    pub verified: Option<bool>,
    pub ring_full_exits: u64,
    pub dirty_limit_events: u64,
    /// Guest progress (writes/s per vCPU) in the second before and during the migration.
    pub progress_before: Vec<f64>,
    pub progress_during: Vec<f64>,
}

#[derive(Serialize)]
pub struct Report {
    pub link: String,
    pub extra: String,
    pub pvm_host: bool,
    pub vcpus: u64,
    pub ring_entries: u32,
    pub timeout_s: f64,
    pub downtime_limit_ms: u64,
    pub rows: Vec<Row>,
}

/// Prints above the progress bar, or to stderr when the bar is hidden (not a terminal).
pub(crate) fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

struct Endpoint {
    netns: Option<&'static str>,
    ip: &'static str,
}

fn command(exe: &std::path::Path, ep: &Endpoint) -> Command {
    match ep.netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => Command::new(exe),
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
}

fn one(
    exe: &std::path::Path,
    o: &Opts,
    src: &Endpoint,
    dst: &Endpoint,
    c: Cell<'_>,
) -> Result<Row> {
    let Cell {
        mem,
        rate,
        set,
        tracker,
        extra: cell_extra,
    } = c;
    let mut cmd = command(exe, dst);
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
    let (mut dest, mut dout, addr) = spawn_destination(cmd)?;
    let addr = addr.as_str();
    let set_bytes = if set == "all" {
        format!("{mem}G")
    } else {
        set.to_string()
    };
    let mut extra: Vec<String> = Vec::new();
    if let Some(b) = &o.max_bandwidth {
        extra.extend(["--max-bandwidth".into(), b.clone()]);
    }
    if let Some(d) = &o.dirty_limit {
        extra.extend(["--dirty-limit".into(), d.clone()]);
    }
    if o.auto_converge {
        extra.push("--auto-converge".into());
    }
    extra.extend(cell_extra);
    let out = command(exe, src)
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
            addr,
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
        .stderr(Stdio::piped())
        .output()
        .context("running the source")?;
    reap_destination(&mut dest);
    let mut rest = String::new();
    let _ = dout.read_to_string(&mut rest);
    let v = source_summary(&out)?;
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
    })
}

/// Starts a destination process (`ringvisor incoming --listen ADDR:0 ...`, its stdout piped
/// here) and reads the address it listens on from its first stdout line.
pub(crate) fn spawn_destination(
    mut cmd: Command,
) -> Result<(
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    String,
)> {
    let mut dest = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the destination")?;
    let mut dout = BufReader::new(dest.stdout.take().context("stdout")?);
    let mut first = String::new();
    dout.read_line(&mut first)?;
    match first.trim().strip_prefix("listening ") {
        Some(addr) => Ok((dest, dout, addr.to_string())),
        None => {
            let _ = dest.kill();
            let _ = dest.wait();
            bail!("destination did not start: {first:?}")
        }
    }
}

/// Waits for a destination process: it exits on its own after a resume, or with an error after
/// an abort; if the source never reached it, it would wait forever: 10 s, then it is killed.
pub(crate) fn reap_destination(dest: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match dest.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            _ => {
                let _ = dest.kill();
                let _ = dest.wait();
                break;
            }
        }
    }
}

/// The JSON summary a `ringvisor run --json` source printed, or why there is none.
pub(crate) fn source_summary(out: &std::process::Output) -> Result<serde_json::Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(6).collect();
        format!(
            "source ({}) printed no summary; its last stderr lines: {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    })
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default()
}

pub fn run(o: Opts) -> Result<()> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: bench migrate needs real KVM");
    }
    let exe = std::env::current_exe()?;
    let (src, dst) = endpoints(&o.link)?;
    let total = o.memory_gib.len() * o.rates_mb.len() * o.sets.len() * o.trackers.len();
    let pb = if o.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} migrations {elapsed} {msg}")
            .expect("static template"),
    );
    let mut rows = Vec::new();
    for &mem in &o.memory_gib {
        for &rate in &o.rates_mb {
            for set in &o.sets {
                for t in &o.trackers {
                    pb.set_message(format!("{mem} GiB, {rate} MB/s, {set}, {t}"));
                    let r = one(
                        &exe,
                        &o,
                        &src,
                        &dst,
                        Cell {
                            mem,
                            rate,
                            set,
                            tracker: t,
                            extra: Vec::new(),
                        },
                    );
                    let r = match r {
                        Ok(r) => r,
                        Err(e) => {
                            say(&pb, format!("{mem} GiB {rate} MB/s {set} {t}: {e:#}"));
                            continue;
                        }
                    };
                    if r.verified == Some(false) {
                        say(&pb, format!("WARNING: memory digest mismatch in {r:?}"));
                    }
                    rows.push(r);
                    pb.inc(1);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
    pb.finish_and_clear();
    if o.link != "loopback" {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/netns.sh");
        let _ = Command::new("bash").arg(&script).arg("down").status();
    }
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
    };
    if let Some(p) = &o.plot {
        plot(&rep, p)?;
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print!("{}", markdown(&rep, &o.trackers));
    }
    Ok(())
}

fn netns_script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/netns.sh")
}

fn netns_down(link: &str) {
    if link != "loopback" {
        let _ = Command::new("bash")
            .arg(netns_script())
            .arg("down")
            .status();
    }
}

/// Source and destination endpoints: loopback, or two namespaces joined by a veth pair shaped
/// to `link` (set up here with scripts/netns.sh).
fn endpoints(link: &str) -> Result<(Endpoint, Endpoint)> {
    if link == "loopback" {
        return Ok((
            Endpoint {
                netns: None,
                ip: "127.0.0.1",
            },
            Endpoint {
                netns: None,
                ip: "127.0.0.1",
            },
        ));
    }
    let script = netns_script();
    let st = Command::new("bash")
        .arg(&script)
        .args(["up", link])
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !st.success() {
        bail!("scripts/netns.sh up {link} failed (needs root and iproute2)");
    }
    Ok((
        Endpoint {
            netns: Some("rv-src"),
            ip: "10.77.0.1",
        },
        Endpoint {
            netns: Some("rv-dst"),
            ip: "10.77.0.2",
        },
    ))
}

/// `ringvisor bench dirtylimit`: QEMU's dirty-limit table shape. For each dirty rate, a guest
/// whose vCPU 0 dirties memory continuously while vCPU 1 only computes is migrated over the
/// link with (a) the ring and `--dirty-limit auto`, (b) the bitmap and `--auto-converge`,
/// (c) the ring without throttling; reports total time, downtime, convergence and how much the
/// computing vCPU was slowed.
pub struct LimitOpts {
    pub rates_mb: Vec<u64>,
    pub memory_gib: u64,
    pub link: String,
    pub timeout: f64,
    pub plot: Option<std::path::PathBuf>,
    pub json: bool,
}

#[derive(Serialize)]
pub struct LimitRow {
    pub method: String,
    pub row: Row,
    /// 1 - (progress of the computing vCPU during the migration / before), in percent.
    pub compute_vcpu_slowdown_pct: Option<f64>,
}

pub fn run_dirtylimit(o: LimitOpts) -> Result<()> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: bench dirtylimit needs real KVM");
    }
    let exe = std::env::current_exe()?;
    let (src, dst) = endpoints(&o.link)?;
    let mo = Opts {
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
        json: o.json,
    };
    let methods: [(&str, &str, &[&str]); 3] = [
        ("dirty-limit", "ring", &["--dirty-limit", "auto"]),
        ("auto-converge", "bitmap", &["--auto-converge"]),
        ("none", "ring", &[]),
    ];
    let pb = if o.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((o.rates_mb.len() * methods.len()) as u64)
    };
    let mut rows = Vec::new();
    for &rate in &o.rates_mb {
        for (name, tracker, args) in methods {
            pb.set_message(format!("{rate} MB/s {name}"));
            let mut extra: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            extra.extend(["--dirty-vcpus".into(), "1".into()]);
            match one(
                &exe,
                &mo,
                &src,
                &dst,
                Cell {
                    mem: o.memory_gib,
                    rate,
                    set: "all",
                    tracker,
                    extra,
                },
            ) {
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
                Err(e) => say(&pb, format!("{rate} MB/s {name}: {e:#}")),
            }
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    netns_down(&o.link);
    if let Some(path) = &o.plot {
        // Total time per method versus dirty rate; a run that did not converge is drawn at
        // the timeout.
        let series: Vec<Series> = methods
            .iter()
            .map(|(name, _, _)| Series {
                name: name.to_string(),
                points: rows
                    .iter()
                    .filter(|r| r.method == *name)
                    .map(|r| {
                        let t = if r.row.converged {
                            r.row.total_s
                        } else {
                            o.timeout
                        };
                        (r.row.dirty_rate_mb_s as f64, t)
                    })
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        if !series.is_empty() {
            line_plot_log_x(
                path,
                &format!(
                    "migration time vs dirty rate ({}; {} s = did not converge)",
                    o.link, o.timeout
                ),
                "dirty rate of vCPU 0 (MB/s)",
                "total migration time (s)",
                &series,
            )?;
        }
    }
    if o.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "link {} | {} GiB guest, vCPU 0 dirties random pages over all memory, vCPU 1 only computes | timeout {} s | host KVM {}\n",
        o.link,
        o.memory_gib,
        o.timeout,
        if kvm_dirty::is_pvm_host() { "PVM" } else { "not PVM" }
    );
    println!("| dirty rate | method | converged | total ms | downtime ms | passes | throttle events | computing vCPU slowed |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} MB/s | {} ({}) | {} | {} | {} | {} | {} | {} |",
            r.row.dirty_rate_mb_s,
            r.method,
            r.row.tracker,
            if r.row.converged { "yes" } else { "no" },
            if r.row.converged {
                format!("{:.0}", r.row.total_s * 1e3)
            } else {
                format!("> {:.0} (timeout)", o.timeout * 1e3)
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
        );
    }
    Ok(())
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
                x.memory_gib == m && x.dirty_rate_mb_s == rate && x.hot_set == set && x.tracker == t
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
    s
}

fn plot(r: &Report, path: &std::path::Path) -> Result<()> {
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
