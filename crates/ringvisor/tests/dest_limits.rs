//! `incoming --max-guest-memory`: a source announcing more is refused before anything is
//! mapped, keeps its guest, and the destination keeps listening for one that fits. Both
//! processes run with their seccomp filters enforced (the default), so this is also a real
//! migration under the filters.

mod common;

use common::{cli, have_kvm, spawn_destination, text};

#[test]
fn a_layout_over_the_destinations_limit_is_refused_and_a_smaller_guest_then_migrates() {
    if !have_kvm("the destination memory limit test") {
        return;
    }
    let (mut dst, addr) = spawn_destination(&["--max-guest-memory", "40M", "--seccomp", "enforce"]);
    let to = format!("tcp:{addr}");
    let source = |memory: &str| {
        cli(&[
            "run",
            "--memory",
            memory,
            "--vcpus",
            "1",
            "--working-set",
            "4M",
            "--dirty-rate",
            "10M",
            "--migrate-to",
            &to,
            "--migrate-after",
            "0",
            "--exit-after-migrate",
            "--seccomp",
            "enforce",
        ])
    };
    let big = source("64M");
    assert_eq!(big.status.code(), Some(1), "{}", text(&big));
    let err = String::from_utf8_lossy(&big.stderr);
    assert!(
        err.contains("more than the receiver's limit of 41943040 bytes"),
        "{err}"
    );
    assert!(!err.contains("seccomp refused"), "{err}");
    let small = source("16M");
    assert_eq!(small.status.code(), Some(0), "{}", text(&small));
    let err = String::from_utf8_lossy(&small.stderr);
    assert!(!err.contains("seccomp refused"), "{err}");
    let _ = dst.kill();
    let _ = dst.wait();
}
