//! The verified-chain cache: chains that passed validation in this build, so a device that
//! reconnects (or sends another request on its connection) is neither validated nor parsed
//! again.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::identity::Identity;

/// A verdict holds from when it was reached until the earliest notAfter or CRL nextUpdate
/// it depended on; nothing else in it depends on the time, and everything else it depends
/// on (bundle, CRLs, policy) belongs to this build: a reload starts empty. One entry per
/// leaf certificate, holding the verdict on the chain last sent with it: a client varying
/// what it sends beside its certificate only replaces its own entry, so only the CA, by
/// issuing certificates, adds entries. An entry keeps the leaf's parsed identity, so a
/// returning device costs a lookup, not a parse; `quick_cache` rather than moka because its
/// per-entry bookkeeping is tens of bytes, not hundreds, which keeps a cached device under
/// 1 KB with its identity (BENCHMARKS.md, "Scale: the floor and many devices"). Public for
/// `examples/chain_cache_memory.rs`.
pub struct VerifiedChains(Option<quick_cache::sync::Cache<[u8; 32], Verdict>>);

#[derive(Clone)]
struct Verdict {
    /// [`ChainKeys::chain`] of the chain that was validated.
    chain: [u8; 32],
    verified_at: i64,
    valid_until: i64,
    identity: Arc<Identity>,
}

/// What identifies a chain as sent.
pub struct ChainKeys {
    /// SHA-256 of the leaf.
    leaf: [u8; 32],
    /// SHA-256 of the leaf's hash and the other certificates, each length-prefixed, in order.
    chain: [u8; 32],
}

impl ChainKeys {
    pub fn of(leaf: &[u8], others: &[CertificateDer<'_>]) -> Self {
        let leaf: [u8; 32] = Sha256::digest(leaf).into();
        let mut chain = Sha256::new();
        chain.update(leaf);
        for cert in others {
            chain.update((cert.len() as u64).to_be_bytes());
            chain.update(cert);
        }
        Self {
            leaf,
            chain: chain.finalize().into(),
        }
    }
}

impl VerifiedChains {
    pub fn new(capacity: usize) -> Self {
        Self((capacity > 0).then(|| quick_cache::sync::Cache::new(capacity)))
    }

    /// The identity of this chain's leaf if the chain passed validation and its verdict
    /// holds at `now`.
    pub fn holds(&self, keys: &ChainKeys, now: i64) -> Option<Arc<Identity>> {
        let verdict = self.0.as_ref()?.get(&keys.leaf)?;
        // A clock set back before the verification must not stretch a verdict.
        (verdict.chain == keys.chain && verdict.verified_at <= now && now < verdict.valid_until)
            .then_some(verdict.identity)
    }

    pub fn put(
        &self,
        keys: ChainKeys,
        identity: Arc<Identity>,
        verified_at: i64,
        valid_until: i64,
    ) {
        if let Some(cache) = &self.0 {
            let verdict = Verdict {
                chain: keys.chain,
                verified_at,
                valid_until,
                identity,
            };
            cache.insert(keys.leaf, verdict);
        }
    }

    /// Entries held.
    pub fn entries(&self) -> usize {
        self.0.as_ref().map_or(0, |cache| cache.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(leaf: &[u8], other: &[u8]) -> ChainKeys {
        ChainKeys::of(leaf, &[CertificateDer::from(other.to_vec())])
    }

    fn identity(serial: &str) -> Arc<Identity> {
        Arc::new(Identity {
            serial: serial.into(),
            ..crate::clients::tests_support::identity()
        })
    }

    #[test]
    fn a_verdict_holds_for_its_chain_and_time_only() {
        let cache = VerifiedChains::new(10);
        cache.put(keys(b"leaf", b"ca"), identity("01"), 100, 200);
        assert_eq!(
            cache
                .holds(&keys(b"leaf", b"ca"), 100)
                .map(|id| id.serial.clone()),
            Some("01".into())
        );
        assert!(cache.holds(&keys(b"leaf", b"ca"), 199).is_some());
        assert!(
            cache.holds(&keys(b"leaf", b"ca"), 200).is_none(),
            "past valid_until"
        );
        assert!(
            cache.holds(&keys(b"leaf", b"ca"), 99).is_none(),
            "clock set back"
        );
        assert!(
            cache.holds(&keys(b"leaf", b"other ca"), 150).is_none(),
            "another chain"
        );
        assert!(
            cache.holds(&keys(b"other leaf", b"ca"), 150).is_none(),
            "another leaf"
        );
        // The chain last sent with a leaf replaces its verdict.
        cache.put(keys(b"leaf", b"other ca"), identity("02"), 100, 200);
        assert!(cache.holds(&keys(b"leaf", b"ca"), 150).is_none());
        assert_eq!(
            cache
                .holds(&keys(b"leaf", b"other ca"), 150)
                .map(|id| id.serial.clone()),
            Some("02".into())
        );
        assert_eq!(cache.entries(), 1);
    }

    #[test]
    fn capacity_zero_remembers_nothing() {
        let cache = VerifiedChains::new(0);
        cache.put(keys(b"leaf", b"ca"), identity("01"), 100, 200);
        assert!(cache.holds(&keys(b"leaf", b"ca"), 150).is_none());
        assert_eq!(cache.entries(), 0);
    }
}
