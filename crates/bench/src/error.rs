//! The benchmarks' error type.

use std::error::Error as StdError;

/// Why a benchmark could not run (a cell that fails is reported through
/// [`crate::Progress::note`] and left out of the table instead).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The benchmark needs `/dev/kvm` and there is none.
    #[error("/dev/kvm is absent: {0} needs real KVM")]
    NoKvm(&'static str),
    /// An option is out of range or malformed.
    #[error("{0}")]
    Invalid(String),
    /// An operating-system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A destination process did not print `listening ADDR:PORT` first.
    #[error("destination did not start: {0:?}")]
    DestinationStart(String),
    /// A source process did not print its JSON summary.
    #[error("source ({status}) printed no summary; its last stderr lines: {stderr_tail}")]
    NoSummary {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// Its last stderr lines, joined by ` | `.
        stderr_tail: String,
    },
    /// `scripts/netns.sh up` failed.
    #[error("scripts/netns.sh up {0} failed (needs root and iproute2)")]
    Netns(String),
    /// Writing the TLS credentials of a `--tls` run failed.
    #[error("TLS credentials for the bench")]
    Tls(#[source] tls::TlsError),
    /// Drawing or writing a plot failed.
    #[error("plot: {0}")]
    Plot(String),
    /// The sync benchmark failed.
    #[error("bench sync")]
    Sync(#[source] vmm::VmmError),
    /// The PVH test kernel could not be built.
    #[error("building the test kernel")]
    TestKernel(#[source] ::pvh::PvhError),
    /// The Linux guest is not built, or its directory lacks a file (`bench migrate --linux`
    /// skips).
    #[error("no Linux guest: {0}")]
    NoLinuxGuest(String),
    /// A Linux guest did not boot or did not go on after a migration.
    #[error("{0}")]
    Linux(String),
    /// A QEMU migration could not be measured.
    #[error(transparent)]
    Qemu(#[from] crate::qemu::QemuError),
}

/// Result with [`BenchError`].
pub type Result<T> = std::result::Result<T, BenchError>;

impl BenchError {
    /// An I/O error with what was being done.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

/// An error and its sources, joined by `: ` (what `anyhow`'s `{:#}` prints).
pub fn error_chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !t.is_empty() && !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
