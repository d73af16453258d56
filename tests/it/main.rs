//! The integration tests: one test crate (`cargo test --test it`), so that `support/` (the
//! PKI, the broker on loopback, the Google fake, the log scanner) compiles once. Each module
//! is one area; run one with `cargo test --test it <module>::`, e.g. `conformance::`.

mod support;

mod agent;
mod chain_validation;
mod cli;
mod conformance;
mod crl_attacks;
mod device_keys;
mod devices;
mod drain;
mod executable;
mod fake_google;
mod form;
mod fuzz_seeds;
mod google;
mod idle_connections;
mod layers;
mod monitoring;
mod name_constraints;
mod operations;
mod properties;
mod reference;
mod reload_state;
mod replicas;
mod resumption;
mod secrets;
mod tls_scan;
mod token_sessions;
mod tokens;
