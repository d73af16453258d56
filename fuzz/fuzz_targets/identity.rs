//! `cargo +nightly fuzz run identity`; the body is `token_broker_fuzz::identity` (see ../README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| token_broker_fuzz::identity(data));
