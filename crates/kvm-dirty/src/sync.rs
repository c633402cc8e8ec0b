//! Atomics used by the ring: `std` normally, `loom` under `--cfg loom` so the protocol can be
//! model-checked with the same consumer/producer code.
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
