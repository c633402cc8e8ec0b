//! Fuzzes ITS command decoding: any 32 bytes decode, and re-encoding keeps what was decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: [u64; 4]| {
    let c = gic::ItsCommand::decode(data);
    assert_eq!(gic::ItsCommand::decode(c.encode()), c);
});
