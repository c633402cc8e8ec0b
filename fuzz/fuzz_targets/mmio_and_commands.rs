//! Fuzzes the MMIO decoder, the ITS command decoder/executor and the CPU interface through
//! `gic::fuzz::run` (which panics only when an invariant breaks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    gic::fuzz::run(data);
});
