//! `cargo +nightly fuzz run form`; the body is `token_broker_fuzz::form` (see ../README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| token_broker_fuzz::form(data));
