//! `cargo +nightly fuzz run identity_structured`; the body is `token_broker_fuzz::identity_structured` (see ../README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| token_broker_fuzz::identity_structured(data));
