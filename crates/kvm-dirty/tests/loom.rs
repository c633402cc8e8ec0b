//! Model check of the ring protocol with loom: a producer (the kernel's push), a consumer
//! (harvest: acquire DIRTY, read slot/offset, release RESET) and a resetter (the kernel's
//! reset: acquire RESET, read slot/offset, release 0) on a 2-entry ring.
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p kvm-dirty --test loom --release`.
#![cfg(loom)]

use kvm_dirty::producer::soft_ring;

const PUSHES: u64 = 2;

#[test]
fn harvest_and_reset_see_every_entry_in_order_with_its_own_slot_and_offset() {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(2);
    b.max_branches = 100_000;
    b.check(|| {
        let (mut p, mut c, mut r) = soft_ring(2, 0).unwrap();
        let producer = loom::thread::spawn(move || {
            let mut i = 0;
            while i < PUSHES {
                match p.push(7, 100 + i) {
                    Ok(_) => i += 1,
                    Err(_) => loom::thread::yield_now(),
                }
            }
        });
        let resetter = loom::thread::spawn(move || {
            let mut seen = Vec::new();
            while (seen.len() as u64) < PUSHES {
                if r.reset(|s, o| seen.push((s, o))) == 0 {
                    loom::thread::yield_now();
                }
            }
            seen
        });
        let mut harvested = Vec::new();
        while (harvested.len() as u64) < PUSHES {
            let (st, _tok) = c.harvest(|s, o| harvested.push((s, o)));
            if st.entries == 0 {
                loom::thread::yield_now();
            }
        }
        producer.join().unwrap();
        let reset_seen = resetter.join().unwrap();
        let expected: Vec<(u32, u64)> = (0..PUSHES).map(|i| (7, 100 + i)).collect();
        assert_eq!(
            harvested, expected,
            "consumer saw exactly the pushed entries, in order"
        );
        assert_eq!(
            reset_seen, expected,
            "reset read the slot/offset published with each entry"
        );
    });
}
