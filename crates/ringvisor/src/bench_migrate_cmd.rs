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
    } = c;
    let mut dest = command(exe, dst)
        .args([
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
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the destination")?;
    let mut dout = BufReader::new(dest.stdout.take().context("stdout")?);
    let mut first = String::new();
    dout.read_line(&mut first)?;
    let Some(addr) = first.trim().strip_prefix("listening ") else {
        let _ = dest.kill();
        bail!("destination did not start: {first:?}");
    };
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
    let out = command(exe, src)
        .args(&extra)
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
        .stderr(Stdio::null())
        .output()
        .context("running the source")?;
    // The destination exits on its own after a resume, or with an error after an abort.
    let mut rest = String::new();
    let _ = dout.read_to_string(&mut rest);
    let _ = dest.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("source output was not a summary: {text}"))?;
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
    })
}

pub fn run(o: Opts) -> Result<()> {
    if !vmm::kvm_available() {
        bail!("/dev/kvm is absent: bench migrate needs real KVM");
    }
    let exe = std::env::current_exe()?;
    let (src, dst) = if o.link == "loopback" {
        (
            Endpoint {
                netns: None,
                ip: "127.0.0.1",
            },
            Endpoint {
                netns: None,
                ip: "127.0.0.1",
            },
        )
    } else {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/netns.sh");
        let st = Command::new("bash")
            .arg(&script)
            .args(["up", &o.link])
            .status()
            .with_context(|| format!("running {}", script.display()))?;
        if !st.success() {
            bail!(
                "scripts/netns.sh up {} failed (needs root and iproute2)",
                o.link
            );
        }
        (
            Endpoint {
                netns: Some("rv-src"),
                ip: "10.77.0.1",
            },
            Endpoint {
                netns: Some("rv-dst"),
                ip: "10.77.0.2",
            },
        )
    };
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
                        },
                    );
                    let r = match r {
                        Ok(r) => r,
                        Err(e) => {
                            pb.println(format!("{mem} GiB {rate} MB/s {set} {t}: {e:#}"));
                            continue;
                        }
                    };
                    if r.verified == Some(false) {
                        pb.println(format!("WARNING: memory digest mismatch in {r:?}"));
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
