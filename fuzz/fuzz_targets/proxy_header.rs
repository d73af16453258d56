//! `cargo +nightly fuzz run proxy_header`; the body is `token_broker_fuzz::proxy_header` (see ../README.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| token_broker_fuzz::proxy_header(data));
