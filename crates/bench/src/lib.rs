//! ringvisor's benchmarks, as a library: each is a function taking a plain option struct and
//! returning a result table (serializable, with a `to_markdown` rendering); the `ringvisor
//! bench` subcommands parse arguments, call them and print.
//!
//! - [`sync`]: dirty-log collect + re-protect cost per mode versus guest size (in process).
//! - [`migrate`]: the migration matrix and the dirty-limit table; every cell is a real
//!   `ringvisor run` source process and a real `ringvisor incoming` destination process
//!   (the binary is passed in), on loopback or across two tc-shaped network namespaces.
//! - [`pvh`]: the PVH-guest rows, ringvisor versus QEMU.
//! - [`linux`]: the Linux-guest rows, ringvisor versus QEMU: a chain of migrations per boot,
//!   the heartbeat checked after each, and the time to user space.
//! - [`qemu`]: the QEMU migration harness (two `qemu-system-x86_64` processes driven over
//!   QMP).
//! - [`replicate`]: continuous replication's pause, latency and bytes per checkpoint, per
//!   tracker, guest size, dirty set and epoch (in process).
//! - [`procs`]: starting and reaping the `ringvisor` processes, the network namespaces.
//! - [`plot`]: SVG line plots.
//! - [`tsc`]: the host's TSC rate, the clock of the PVH guests' own write rate.
//!
//! Long runs report progress through [`Progress`]; nothing here prints to stdout.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod error;
pub mod linux;
pub mod migrate;
pub mod plot;
pub mod procs;
pub mod pvh;
pub mod qemu;
pub mod replicate;
pub mod sync;
mod sys;
pub mod tsc;

pub use error::{error_chain, BenchError, Result};

/// Where a benchmark reports its progress: a progress bar in the CLI, nothing in tests.
pub trait Progress {
    /// The number of steps (migrations, collects) the run will take.
    fn start(&mut self, _total: u64, _unit: &'static str) {}
    /// The step about to run, e.g. `1 GiB, 200 MB/s, all, ring`.
    fn step(&mut self, _what: &str) {}
    /// One step is done.
    fn inc(&mut self) {}
    /// A line for the user (a failed cell, a digest mismatch, a missing QEMU).
    fn note(&mut self, _line: &str) {}
    /// The run is over (clear the bar).
    fn finish(&mut self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
