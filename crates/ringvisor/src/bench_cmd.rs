//! `ringvisor bench dirtylimit|migrate|sync`: clap arguments -> `bench` options -> run ->
//! print. The benchmarks themselves live in the `bench` crate.

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr (hidden with `--json` or when stderr is not a terminal); notes go
/// above it, or to stderr when it is hidden.
pub struct Bar {
    pb: ProgressBar,
    hidden: bool,
}

impl Bar {
    /// A bar, hidden when the output is JSON.
    pub fn new(json: bool) -> Bar {
        Bar {
            pb: ProgressBar::hidden(),
            hidden: json,
        }
    }
}

impl bench::Progress for Bar {
    fn start(&mut self, total: u64, unit: &'static str) {
        if self.hidden {
            return;
        }
        self.pb = ProgressBar::new(total);
        let template = match unit {
            "collects" => "{bar:30} {pos}/{len} collects {elapsed}".to_string(),
            u => format!("{{bar:30}} {{pos}}/{{len}} {u} {{elapsed}} {{msg}}"),
        };
        if let Ok(style) = ProgressStyle::with_template(&template) {
            self.pb.set_style(style);
        }
    }

    fn step(&mut self, what: &str) {
        self.pb.set_message(what.to_string());
    }

    fn inc(&mut self) {
        self.pb.inc(1);
    }

    fn note(&mut self, line: &str) {
        if self.pb.is_hidden() {
            eprintln!("{line}");
        } else {
            self.pb.println(line);
        }
    }

    fn finish(&mut self) {
        self.pb.finish_and_clear();
    }
}

/// Prints a report as pretty JSON or as its markdown.
pub fn print<T: serde::Serialize>(
    json: bool,
    value: &T,
    markdown: impl FnOnce() -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", markdown());
    }
    Ok(())
}

/// `ringvisor bench migrate` (without `--pvh`).
pub fn migrate(o: bench::migrate::MigrateOpts, json: bool) -> Result<()> {
    let r = bench::migrate::run(&o, &mut Bar::new(json))?;
    print(json, &r, || r.to_markdown())
}

/// `ringvisor bench migrate --pvh`.
pub fn pvh(o: bench::pvh::PvhOpts, json: bool) -> Result<()> {
    let r = bench::pvh::run(&o, &mut Bar::new(json))?;
    print(json, &r, || r.to_markdown())
}

/// `ringvisor bench dirtylimit` (its JSON is the rows only).
pub fn dirtylimit(o: bench::migrate::LimitOpts, json: bool) -> Result<()> {
    let r = bench::migrate::run_dirtylimit(&o, &mut Bar::new(json))?;
    print(json, &r.rows, || r.to_markdown())
}

/// `ringvisor bench sync`.
pub fn sync(o: bench::sync::SyncOpts, json: bool) -> Result<()> {
    let r = bench::sync::run(&o, &mut Bar::new(json))?;
    print(json, &r, || bench::sync::to_markdown(&r, o.plot.as_deref()))
}
