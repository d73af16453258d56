//! The device side: asking a broker for a token over mutual TLS (`token-broker token`) and
//! serving it to Google's client libraries as a GCE metadata server (`token-broker agent`).
//! It shares only the bottom modules with the server (time, crypto, PEM files, identity).
//! The device's certificate and key come from files or a PKCS#11 token (`credentials`,
//! `pkcs11`).

pub mod agent;
pub mod client;
pub mod credentials;
pub mod error;
pub mod executable;
pub mod local_peer;
pub mod pkcs11;
pub mod private_file;
pub mod token;
