//! Human output of migrations: the progress line (from a `query-migrate` result) and the
//! summary of a finished migration. Units: MiB and MiB/s for people, ms for times.

use serde_json::Value;

const MIB: f64 = (1u64 << 20) as f64;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// `active | pass 3 | sent 120.5 MiB | remaining 30.1 MiB | 95.3 MiB/s` from a
/// `query-migrate` result.
pub fn progress_line(info: &Value) -> String {
    let ram = &info["ram"];
    let pass = info["x-ringvisor"]["pass"]
        .as_u64()
        .unwrap_or_else(|| u(&ram["dirty-sync-count"]).saturating_sub(1));
    // QEMU's `mbps` is megabits (10^6) per second.
    let rate = ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0 / MIB;
    format!(
        "{} | pass {pass} | sent {:.1} MiB | remaining {:.1} MiB | {rate:.1} MiB/s",
        info["status"].as_str().unwrap_or("none"),
        u(&ram["transferred"]) as f64 / MIB,
        u(&ram["remaining"]) as f64 / MIB,
    )
}

/// One sentence for how a migration ended, from its final `query-migrate` result.
pub fn outcome_sentence(info: &Value) -> String {
    let why = info["error-desc"].as_str().unwrap_or("no reason given");
    match info["status"].as_str().unwrap_or("none") {
        "completed" => "completed: the guest runs on the destination".into(),
        "cancelled" => "cancelled: the guest keeps running on the source".into(),
        "failed" => format!("failed ({why}): the guest keeps running on the source"),
        other => format!("{other} (not finished)"),
    }
}

/// The finished migration (its `MigrationSummary` as JSON): outcome, times, volume, digest
/// check and the pass table. Missing fields print as 0 (a summary from another version).
pub fn summary_text(info: &Value, s: &Value) -> String {
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    let passes = s["iterations"].as_array().cloned().unwrap_or_default();
    let mut out = format!("migration {}\n", outcome_sentence(info));
    out.push_str(&format!(
        "tracker {} | total {:.0} ms | setup {:.0} ms | downtime {:.1} ms (limit {} ms) | {} passes\n",
        s["tracker"].as_str().unwrap_or("?"),
        f("total_ms"),
        f("setup_ms"),
        f("downtime_ms"),
        u(&s["downtime_limit_ms"]),
        passes.len()
    ));
    out.push_str(&format!(
        "sent {:.1} MiB ({} pages, {} as zero markers) at {:.1} MiB/s on average | ring-full exits {} | memory digests: {}\n",
        f("bytes_sent") / MIB,
        u(&s["pages_sent"]),
        u(&s["zero_pages"]),
        f("bandwidth_bytes_per_s") / MIB,
        u(&s["ring_full_exits"]),
        match s["verified"].as_bool() {
            Some(true) => "match",
            Some(false) => "DIFFER",
            None => "not compared",
        }
    ));
    let parts: Vec<String> = s["downtime_breakdown_ms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} {:.1} ms",
                p[0].as_str().unwrap_or("?"),
                p[1].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    if !parts.is_empty() {
        out.push_str(&format!("downtime: {}\n", parts.join(", ")));
    }
    out.push_str(
        "pass |    pages |     zero |     MiB |      ms | dirty pages/s | guest faults | per-vCPU dirty pages/s\n",
    );
    for it in &passes {
        let per = it["vcpu_dirty_rates"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|r| format!("{:.0}", r.as_f64().unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:>4} | {:>8} | {:>8} | {:>7.1} | {:>7.1} | {:>13.0} | {:>12} | {per}\n",
            u(&it["iteration"]),
            u(&it["pages"]),
            u(&it["zero_pages"]),
            it["bytes"].as_f64().unwrap_or(0.0) / MIB,
            it["ms"].as_f64().unwrap_or(0.0),
            it["dirty_rate_pages_per_s"].as_f64().unwrap_or(0.0),
            it["guest_faults"]
                .as_u64()
                .map_or_else(|| "-".to_string(), |f| f.to_string()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn progress_shows_pass_mib_and_mib_per_s() {
        let info = json!({"status": "active", "ram": {"transferred": 3u64 << 20,
            "remaining": 1u64 << 20, "mbps": 8.388608, "dirty-sync-count": 3},
            "x-ringvisor": {"pass": 2}});
        assert_eq!(
            progress_line(&info),
            "active | pass 2 | sent 3.0 MiB | remaining 1.0 MiB | 1.0 MiB/s"
        );
        assert_eq!(
            progress_line(&json!({})),
            "none | pass 0 | sent 0.0 MiB | remaining 0.0 MiB | 0.0 MiB/s"
        );
    }

    #[test]
    fn outcomes_are_sentences() {
        assert_eq!(
            outcome_sentence(
                &json!({"status": "failed", "error-desc": "connecting to x: refused"})
            ),
            "failed (connecting to x: refused): the guest keeps running on the source"
        );
        assert!(outcome_sentence(&json!({"status": "completed"})).starts_with("completed"));
    }
}
