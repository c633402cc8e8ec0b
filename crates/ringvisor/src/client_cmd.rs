//! The QMP clients: `ringvisor migrate | status | cancel | set-parameter | dirtyrate |
//! dirty-limit | quit --qmp PATH` speak QMP to a VM process, as a QEMU user's tools do.
//! A QMP error reply is an operation that failed (exit status 1).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use qmp::{ClientError, QmpClient};
use serde_json::{json, Value};

use crate::cli_args::{GuestArgs, MigrateArgs};
use crate::{report, sys, usage_error};

fn connect(path: &Path) -> Result<QmpClient> {
    QmpClient::connect(path, Duration::from_secs(10))
        .with_context(|| format!("connecting to the QMP monitor {}", path.display()))
}

fn exec(c: &mut QmpClient, name: &str, args: Value) -> Result<Value> {
    match c.execute(name, args) {
        Ok(v) => Ok(v),
        Err(ClientError::Command(e)) => bail!("{name}: {}", e.desc),
        Err(e) => Err(e).with_context(|| name.to_string()),
    }
}

fn is_final(info: &Value) -> bool {
    matches!(
        info["status"].as_str(),
        Some("completed" | "failed" | "cancelled")
    )
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `ringvisor migrate`.
pub struct MigrateOpts {
    pub qmp: PathBuf,
    pub to: String,
    pub params: MigrateArgs,
    pub detach: bool,
    pub json: bool,
}

/// Sets the given parameters and capabilities, starts the migration and follows it until a
/// final status (or returns at once with `detach`). Exit status 0 only if it completed.
pub fn migrate(o: MigrateOpts) -> Result<i32> {
    let uri = control::uri::with_scheme(&o.to);
    if let Err(e) = control::uri::tcp_addr(&uri) {
        usage_error(format!("--to: {e}"));
    }
    if !o.detach {
        // From the start: a Ctrl-C racing the `migrate` reply must not kill the client.
        sys::catch_sigint();
    }
    let mut c = connect(&o.qmp)?;
    let set = o.params.set_parameters();
    if !set.is_empty() {
        exec(
            &mut c,
            "migrate-set-parameters",
            serde_json::to_value(&set)?,
        )?;
    }
    let caps = o.params.capabilities();
    if !caps.is_empty() {
        exec(
            &mut c,
            "migrate-set-capabilities",
            json!({ "capabilities": caps }),
        )?;
    }
    exec(&mut c, "migrate", json!({ "uri": uri }))?;
    let qmp = o.qmp.display().to_string();
    if o.detach {
        let info = exec(&mut c, "query-migrate", Value::Null)?;
        if o.json {
            print_json(&info)?;
        } else {
            println!("migration to {uri} started; follow it with `ringvisor status --qmp {qmp}`, cancel it with `ringvisor cancel --qmp {qmp}`");
        }
        return Ok(0);
    }
    let pb = if o.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
        pb.set_style(style);
    }
    let info = loop {
        let info = exec(&mut c, "query-migrate", Value::Null)?;
        if is_final(&info) {
            pb.finish_and_clear();
            break info;
        }
        if sys::interrupted() {
            pb.finish_and_clear();
            eprintln!("interrupted: the migration keeps running; cancel it with: ringvisor cancel --qmp {qmp}");
            if o.json {
                print_json(&info)?;
            }
            return Ok(0);
        }
        pb.set_message(report::progress_line(&info));
        pb.tick();
        std::thread::sleep(Duration::from_millis(200));
    };
    let passes = exec(&mut c, "x-ringvisor-query-migration-passes", Value::Null)?;
    if o.json {
        print_json(&json!({"query-migrate": info, "x-ringvisor-summary": passes["summary"]}))?;
    } else {
        print!("{}", report::summary_text(&info, &passes["summary"]));
    }
    Ok(if info["status"] == "completed" { 0 } else { 1 })
}

/// `ringvisor status`: the run state and, if any, the migration (pass, bytes sent,
/// remaining, rate).
pub fn status(qmp: &Path, json: bool) -> Result<i32> {
    let mut c = connect(qmp)?;
    let st = exec(&mut c, "query-status", Value::Null)?;
    let mig = exec(&mut c, "query-migrate", Value::Null)?;
    if json {
        print_json(&json!({"status": st, "migration": mig}))?;
        return Ok(0);
    }
    println!("run state: {}", st["status"].as_str().unwrap_or("?"));
    if mig.get("status").is_some() {
        println!("migration: {}", report::progress_line(&mig));
        if let Some(e) = mig["error-desc"].as_str() {
            println!("migration error: {e}");
        }
        if let (Some(t), Some(d)) = (mig["total-time"].as_u64(), mig["downtime"].as_u64()) {
            println!("migration took {t} ms with {d} ms of downtime");
        }
        if let Some(sa) = mig["socket-address"].as_array().and_then(|a| a.first()) {
            println!(
                "incoming migration on {}:{}",
                sa["host"].as_str().unwrap_or("?"),
                sa["port"].as_str().unwrap_or("?")
            );
        }
    } else {
        println!("migration: none");
    }
    Ok(0)
}

/// `ringvisor cancel`: cancels the migration and waits for its final status. Exit status 0
/// when the guest stays on the source (cancelled, failed or nothing to cancel), 1 if the
/// migration completed anyway (too late to cancel).
pub fn cancel(qmp: &Path) -> Result<i32> {
    let mut c = connect(qmp)?;
    let before = exec(&mut c, "query-migrate", Value::Null)?;
    if before.get("status").is_none() || is_final(&before) {
        println!(
            "no migration in progress ({})",
            before["status"].as_str().unwrap_or("none")
        );
        return Ok(0);
    }
    exec(&mut c, "migrate_cancel", Value::Null)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let info = loop {
        let info = exec(&mut c, "query-migrate", Value::Null)?;
        if is_final(&info) {
            break info;
        }
        if Instant::now() > deadline {
            bail!(
                "the migration did not end within 60 s of the cancel ({})",
                report::progress_line(&info)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    println!("migration {}", report::outcome_sentence(&info));
    Ok(if info["status"] == "completed" { 1 } else { 0 })
}

/// The QMP value of `set-parameter NAME VALUE`: sizes and rates with K/M/G (binary), booleans,
/// `abort`/`force`, or a plain integer.
fn parameter_value(name: &str, value: &str) -> Result<Value, String> {
    match name {
        "max-bandwidth" | "x-ringvisor-dirty-limit" => migration::units::parse_bandwidth(value)
            .map(Value::from)
            .map_err(|e| e.to_string()),
        "x-ringvisor-verify" | "x-ringvisor-verify-before-commit" => match value {
            "true" | "on" => Ok(Value::Bool(true)),
            "false" | "off" => Ok(Value::Bool(false)),
            _ => Err(format!("{name} takes true or false, not {value:?}")),
        },
        "x-ringvisor-on-timeout" | "tls-hostname" | "tls-authz" => Ok(Value::from(value)),
        // The VM process may run in another directory than this client.
        "tls-creds" if !value.is_empty() => std::path::absolute(value)
            .map(|p| Value::from(p.display().to_string()))
            .map_err(|e| format!("tls-creds {value:?}: {e}")),
        "tls-creds" => Ok(Value::from("")),
        _ if control::params::PARAMETER_NAMES.contains(&name) => value
            .parse::<u64>()
            .map(Value::from)
            .map_err(|_| format!("{name} takes a non-negative integer, not {value:?}")),
        _ => Err(format!(
            "unknown parameter {name:?}; known: {}",
            control::params::PARAMETER_NAMES.join(", ")
        )),
    }
}

/// `ringvisor set-parameter`.
pub fn set_parameter(qmp: &Path, name: &str, value: &str) -> Result<i32> {
    let v = parameter_value(name, value).unwrap_or_else(|e| usage_error(e));
    let mut c = connect(qmp)?;
    exec(&mut c, "migrate-set-parameters", json!({ name: v }))?;
    let now = exec(&mut c, "query-migrate-parameters", Value::Null)?;
    println!("{name} = {}", now[name]);
    Ok(0)
}

/// `ringvisor dirtyrate --qmp`: `calc-dirty-rate`, then `query-dirty-rate` until measured.
pub fn dirtyrate(
    qmp: &Path,
    calc_time: u64,
    mode: &str,
    sample_pages: Option<u64>,
    json: bool,
) -> Result<i32> {
    let mut c = connect(qmp)?;
    let mut args = json!({"calc-time": calc_time, "mode": mode});
    if let Some(p) = sample_pages {
        args["sample-pages"] = json!(p);
    }
    exec(&mut c, "calc-dirty-rate", args)?;
    let deadline = Instant::now() + Duration::from_secs(calc_time + 60);
    let r = loop {
        let r = exec(&mut c, "query-dirty-rate", Value::Null)?;
        if r["status"] == "measured" {
            break r;
        }
        if Instant::now() > deadline {
            bail!(
                "the dirty rate was not measured within {} s",
                calc_time + 60
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some(e) = r["x-ringvisor-error"].as_str() {
        bail!("the measurement failed: {e}");
    }
    if json {
        print_json(&r)?;
        return Ok(0);
    }
    println!(
        "dirty rate: {} MB/s ({mode}, over {calc_time} s; 1 MB = 2^20 bytes as in QEMU)",
        r["dirty-rate"]
    );
    for v in r["vcpu-dirty-rate"].as_array().into_iter().flatten() {
        println!("  vCPU {}: {} MB/s", v["id"], v["dirty-rate"]);
    }
    Ok(0)
}

/// `ringvisor dirty-limit --qmp`.
pub fn dirty_limit(
    qmp: &Path,
    set: Option<u64>,
    cancel: bool,
    cpu: Option<u64>,
    json: bool,
) -> Result<i32> {
    let mut c = connect(qmp)?;
    let mut args = json!({});
    if let Some(i) = cpu {
        args["cpu-index"] = json!(i);
    }
    match (set, cancel) {
        (Some(rate), false) => {
            args["dirty-rate"] = json!(rate >> 20);
            exec(&mut c, "set-vcpu-dirty-limit", args)?;
        }
        (None, true) => {
            exec(&mut c, "cancel-vcpu-dirty-limit", args)?;
        }
        _ => usage_error("give --set RATE or --cancel"),
    }
    let now = exec(&mut c, "query-vcpu-dirty-limit", Value::Null)?;
    if json {
        print_json(&now)?;
    } else if now.as_array().is_some_and(|a| a.is_empty()) {
        println!("no vCPU dirty limit");
    } else {
        for v in now.as_array().into_iter().flatten() {
            println!(
                "vCPU {}: limit {} MB/s, dirtying {} MB/s (1 MB = 2^20 bytes as in QEMU)",
                v["cpu-index"], v["limit-rate"], v["current-rate"]
            );
        }
    }
    Ok(0)
}

/// `ringvisor quit`.
pub fn quit(qmp: &Path) -> Result<i32> {
    let mut c = connect(qmp)?;
    match c.execute("quit", Value::Null) {
        // The process may end before its reply arrives.
        Ok(_) | Err(ClientError::Closed) => {
            println!("the VM process quits");
            Ok(0)
        }
        Err(e) => Err(e).context("quit"),
    }
}

/// `ringvisor dirtyrate` without `--qmp`: the same workload on a ring VM (ring + sampling) and
/// on a bitmap VM (bitmap + sampling), since KVM cannot give one VM both.
pub fn dirtyrate_standalone(
    g: &GuestArgs,
    calc_time: u64,
    sample_pages: u64,
    watch: u32,
    json: bool,
) -> Result<i32> {
    use migration_engine::dirtyrate as dr;
    crate::vm_cmd::check_guest(g);
    let window = Duration::from_secs(calc_time);
    let mut all = Vec::new();
    for t in [
        crate::cli_args::TrackerArg::Ring,
        crate::cli_args::TrackerArg::Bitmap,
    ] {
        let mut g = g.clone();
        g.track.tracker = t;
        let mut vm = crate::vm_cmd::start_guest(&g)?;
        std::thread::sleep(Duration::from_millis(1000));
        for _ in 0..watch.max(1) {
            let (exact, sample) = std::thread::scope(|sc| {
                let exact = sc.spawn(|| match t {
                    crate::cli_args::TrackerArg::Ring => dr::measure_ring(&vm, window),
                    _ => dr::measure_bitmap(&vm, window),
                });
                let sample = dr::measure_sample(&vm, window, sample_pages, 7);
                (exact.join(), sample)
            });
            let exact = exact.map_err(|_| anyhow::anyhow!("the measurement thread panicked"))??;
            for r in [exact, sample?] {
                if json {
                    all.push(json!({"vm": t.name(), "rate": r}));
                    continue;
                }
                let per = r
                    .vcpu_pages_per_s
                    .as_ref()
                    .map(|v| {
                        let mb: Vec<String> = v
                            .iter()
                            .map(|p| format!("{:.1}", p * 4096.0 / (1 << 20) as f64))
                            .collect();
                        format!(" | per vCPU MiB/s [{}]", mb.join(", "))
                    })
                    .unwrap_or_default();
                println!(
                    "[{} VM] {:>8}: {:>10.0} pages/s = {:>8.1} MiB/s{per}",
                    t.name(),
                    serde_json::to_value(r.method)?.as_str().unwrap_or("?"),
                    r.pages_per_s,
                    r.pages_per_s * 4096.0 / (1 << 20) as f64,
                );
            }
        }
        vm.stop()?;
    }
    if json {
        print_json(&Value::Array(all))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_values_take_binary_sizes_booleans_and_integers() {
        assert_eq!(parameter_value("max-bandwidth", "8M"), Ok(json!(8 << 20)));
        assert_eq!(parameter_value("max-bandwidth", "1G"), Ok(json!(1 << 30)));
        assert_eq!(parameter_value("downtime-limit", "100"), Ok(json!(100)));
        assert!(parameter_value("downtime-limit", "1s").is_err());
        assert_eq!(
            parameter_value("x-ringvisor-verify", "off"),
            Ok(json!(false))
        );
        assert!(parameter_value("downtime_limit", "1")
            .unwrap_err()
            .contains("unknown parameter"));
    }

    #[test]
    fn tls_parameters_are_strings_and_tls_creds_becomes_absolute() {
        assert_eq!(parameter_value("tls-authz", "a,b"), Ok(json!("a,b")));
        assert_eq!(parameter_value("tls-hostname", "dst"), Ok(json!("dst")));
        assert_eq!(parameter_value("tls-creds", ""), Ok(json!("")));
        let v = parameter_value("tls-creds", "creds").unwrap();
        let p = v.as_str().unwrap();
        assert!(p.starts_with('/') && p.ends_with("/creds"), "{p}");
    }
}
