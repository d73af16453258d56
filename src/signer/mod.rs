//! Signing the broker's own JWTs, and publishing the keys that verify them.
//!
//! A [`Signer`] owns both sides so that the JWKS can never disagree with what was signed.
//! `local` holds PEM keys from `key_dir`; a Google IAM `signJwt` signer plugs in the same way.

mod contract;
mod iam;
mod local;

pub use contract::{Signer, SignerError};
pub use iam::IamSigner;
pub use local::LocalSigner;
