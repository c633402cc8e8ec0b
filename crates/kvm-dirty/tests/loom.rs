//! Model check of the ring protocol with loom: a producer (the kernel's push), a consumer
//! (harvest: acquire DIRTY, read slot/offset, release RESET) and a resetter (the kernel's
//! reset: acquire RESET, read slot/offset, release 0) running concurrently on a 2-entry ring.
//! Each thread makes a bounded number of attempts (no spinning), then the main thread drains
//! what is left; every interleaving must deliver every entry once, in order, with the
//! slot/offset that was published with it, to both the consumer and the resetter.
//! Checked to be able to fail: with the consumer's RESET store weakened to Relaxed, loom
//! finds an interleaving where the reset reads a stale slot/offset (Paolo Bonzini's 2022 QEMU
//! fix) and this test fails.
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p kvm-dirty --test loom --release`.
#![cfg(loom)]

use kvm_dirty::producer::soft_ring;

#[test]
fn harvest_and_reset_see_every_entry_in_order_with_its_own_slot_and_offset() {
    loom::model(|| {
        let (mut p, mut c, mut r) = soft_ring(2, 0).unwrap();
        let producer = loom::thread::spawn(move || {
            p.push(7, 100).unwrap();
            p.push(7, 101).unwrap();
            p
        });
        let resetter = loom::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..2 {
                r.reset(|s, o| seen.push((s, o)));
            }
            (r, seen)
        });
        let mut harvested = Vec::new();
        for _ in 0..2 {
            let _ = c.harvest(|s, o| harvested.push((s, o)));
        }
        let mut p = producer.join().unwrap();
        let (mut r, mut reset_seen) = resetter.join().unwrap();
        // Drain: everything not yet harvested or reset is still there, in order.
        let _ = c.harvest(|s, o| harvested.push((s, o)));
        r.reset(|s, o| reset_seen.push((s, o)));
        let expected = vec![(7, 100), (7, 101)];
        assert_eq!(
            harvested, expected,
            "consumer saw every pushed entry once, in order"
        );
        assert_eq!(
            reset_seen, expected,
            "reset read the slot/offset published with each entry"
        );
        assert_eq!(p.used(), 0, "every entry was recycled");
        // The recycled entries can be reused: the ring wraps correctly.
        p.push(7, 102).unwrap();
        let mut again = Vec::new();
        let _ = c.harvest(|s, o| again.push((s, o)));
        assert_eq!(again, vec![(7, 102)]);
    });
}
