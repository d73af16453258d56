//! `cargo +nightly fuzz run jwt_encode`; the body is `token_broker_fuzz::jwt_encode` (see ../README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| token_broker_fuzz::jwt_encode(data));
