//! Every numeric flag refuses non-finite, negative, zero-where-nonsensical and out-of-range
//! values before anything starts: exit status 2, nothing on stdout, and a message on stderr
//! that names the valid range. None of these needs /dev/kvm (nothing may start).

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_ringvisor");

/// (arguments, a phrase the error message must contain)
const CASES: &[(&[&str], &str)] = &[
    // Durations: NaN, infinity, negative, zero.
    (
        &["run", "--duration", "nan"],
        "greater than 0 and at most 1000000",
    ),
    (
        &["run", "--duration=-1"],
        "greater than 0 and at most 1000000",
    ),
    (
        &["run", "--duration", "0"],
        "greater than 0 and at most 1000000",
    ),
    (
        &[
            "run",
            "--migrate-after",
            "inf",
            "--migrate-to",
            "127.0.0.1:1",
        ],
        "from 0 to 1000000",
    ),
    (
        &["run", "--timeout", "nan"],
        "greater than 0 and at most 1000000",
    ),
    (
        &["incoming", "--duration", "inf", "--listen", "127.0.0.1:0"],
        "greater than 0",
    ),
    // A console text: not empty, and only for a guest with a console (--kernel).
    (
        &[
            "run",
            "--kernel",
            "/nonexistent",
            "--migrate-to",
            "127.0.0.1:1",
            "--migrate-after-output",
            "",
        ],
        "1 to 256 bytes",
    ),
    (
        &[
            "run",
            "--migrate-to",
            "127.0.0.1:1",
            "--migrate-after-output",
            "login:",
        ],
        "--kernel",
    ),
    // Counts and their relations.
    (&["run", "--vcpus", "0"], "1..=64"),
    (
        &["run", "--vcpus", "1", "--dirty-vcpus", "5"],
        "1 to --vcpus (1)",
    ),
    (&["run", "--dirty-vcpus", "0"], "1..=64"),
    // Rates and limits.
    (&["run", "--vcpu-dirty-limit", "0"], "at least 1 MiB/s"),
    (&["run", "--downtime-limit", "2000001"], "0..=2000000"),
    (&["run", "--max-bandwidth", "-5M"], ""),
    // The destination: ring size and its limits, checked before it listens.
    (
        &["incoming", "--listen", "127.0.0.1:0", "--ring-entries", "3"],
        "power of two from 256 to 1048576",
    ),
    (
        &[
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--max-guest-memory",
            "1K",
        ],
        "from 2M to 64T",
    ),
    (
        &[
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--max-guest-memory",
            "100000G",
        ],
        "from 2M to 64T",
    ),
    (
        &[
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--progress-timeout",
            "0",
        ],
        "greater than 0 and at most 1000000",
    ),
    (
        &[
            "incoming",
            "--listen",
            "127.0.0.1:0",
            "--handshake-timeout",
            "nan",
        ],
        "greater than 0 and at most 1000000",
    ),
    // Benchmarks.
    (
        &["bench", "migrate", "--timeout", "nan"],
        "greater than 0 and at most 1000000",
    ),
    (
        &["bench", "migrate", "--ring-entries", "100"],
        "power of two from 256 to 1048576",
    ),
    (&["bench", "migrate", "--vcpus", "0"], "1..=64"),
    (&["bench", "migrate", "--memory-gib", "0"], "1..=1024"),
    (
        &["bench", "migrate", "--pvh-warmup", "nan"],
        "greater than 0 and at most 1000000",
    ),
    (
        &["bench", "migrate", "--dirty-limit", "0"],
        "at least 1 MiB/s",
    ),
    (
        &["bench", "migrate", "--downtime-limit", "9999999"],
        "0..=2000000",
    ),
    (
        &["bench", "sync", "--ring-entries", "3"],
        "power of two from 256 to 1048576",
    ),
    (&["bench", "sync", "--dirty-pages", "0"], "1..=268435456"),
    (
        &["bench", "dirtylimit", "--timeout", "inf"],
        "greater than 0 and at most 1000000",
    ),
    (&["bench", "gic", "--lpis", "0"], "1..=1000000000"),
    (
        &["bench", "migrate", "--linux", "--linux-period-ms", "5"],
        "10..=10000",
    ),
    (
        &["bench", "migrate", "--linux", "--linux-boots", "0"],
        "1..=20",
    ),
    (
        &["bench", "migrate", "--linux", "--linux-workloads", "busy"],
        "idle, dirtying",
    ),
    (
        &["bench", "migrate", "--linux", "--linux-memory", "lots"],
        "lots",
    ),
    // The sandbox switch.
    (&["--seccomp", "maybe", "caps"], "enforce, log, off"),
];

#[test]
fn nonsense_numbers_are_usage_errors_that_name_the_valid_range() {
    let mut failures = Vec::new();
    for (args, phrase) in CASES {
        let out = Command::new(EXE)
            .args(*args)
            .output()
            .expect("run ringvisor");
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.code() != Some(2) || !out.stdout.is_empty() || !stderr.contains(phrase) {
            failures.push(format!(
                "{args:?}: status {:?}, stdout {:?}, stderr {stderr:?} (wanted {phrase:?})",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
