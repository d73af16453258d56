//! `cargo +nightly fuzz run config`; the body is `token_broker_fuzz::config` (see ../README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| token_broker_fuzz::config(data));
