//! The verified-chain cache: chains that passed validation in this build, so a device that
//! reconnects (or sends another request on its connection) is not validated again.

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

/// A verdict holds from when it was reached until the earliest notAfter or CRL nextUpdate
/// it depended on; nothing else in it depends on the time, and everything else it depends
/// on (bundle, CRLs, policy) belongs to this build: a reload starts empty. One entry per
/// leaf certificate, holding the verdict on the chain last sent with it: a client varying
/// what it sends beside its certificate only replaces its own entry, so only the CA, by
/// issuing certificates, adds entries. An entry is the verdict alone (hashes and times,
/// no allocation of its own): the identity is parsed again from the leaf, once per
/// connection, which keeps a cached device at a few hundred bytes (BENCHMARKS.md, "Scale:
/// the floor and many devices"). Public for `examples/chain_cache_memory.rs`.
pub struct VerifiedChains(Option<moka::sync::Cache<[u8; 32], Verdict>>);

#[derive(Clone, Copy)]
struct Verdict {
    /// [`ChainKeys::chain`] of the chain that was validated.
    chain: [u8; 32],
    verified_at: i64,
    valid_until: i64,
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
        Self((capacity > 0).then(|| moka::sync::Cache::new(capacity as u64)))
    }

    /// Whether this chain passed validation and its verdict holds at `now`.
    pub fn holds(&self, keys: &ChainKeys, now: i64) -> bool {
        let Some(verdict) = self.0.as_ref().and_then(|cache| cache.get(&keys.leaf)) else {
            return false;
        };
        // A clock set back before the verification must not stretch a verdict.
        verdict.chain == keys.chain && verdict.verified_at <= now && now < verdict.valid_until
    }

    pub fn put(&self, keys: ChainKeys, verified_at: i64, valid_until: i64) {
        if let Some(cache) = &self.0 {
            let verdict = Verdict {
                chain: keys.chain,
                verified_at,
                valid_until,
            };
            cache.insert(keys.leaf, verdict);
        }
    }

    /// Entries held, once the cache's pending bookkeeping is done.
    pub fn settled_len(&self) -> u64 {
        self.0.as_ref().map_or(0, |cache| {
            cache.run_pending_tasks();
            cache.entry_count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(leaf: &[u8], other: &[u8]) -> ChainKeys {
        ChainKeys::of(leaf, &[CertificateDer::from(other.to_vec())])
    }

    #[test]
    fn a_verdict_holds_for_its_chain_and_time_only() {
        let cache = VerifiedChains::new(10);
        cache.put(keys(b"leaf", b"ca"), 100, 200);
        assert!(cache.holds(&keys(b"leaf", b"ca"), 100));
        assert!(cache.holds(&keys(b"leaf", b"ca"), 199));
        assert!(!cache.holds(&keys(b"leaf", b"ca"), 200), "past valid_until");
        assert!(!cache.holds(&keys(b"leaf", b"ca"), 99), "clock set back");
        assert!(
            !cache.holds(&keys(b"leaf", b"other ca"), 150),
            "another chain"
        );
        assert!(
            !cache.holds(&keys(b"other leaf", b"ca"), 150),
            "another leaf"
        );
        // The chain last sent with a leaf replaces its verdict.
        cache.put(keys(b"leaf", b"other ca"), 100, 200);
        assert!(!cache.holds(&keys(b"leaf", b"ca"), 150));
        assert!(cache.holds(&keys(b"leaf", b"other ca"), 150));
        assert_eq!(cache.settled_len(), 1);
    }

    #[test]
    fn capacity_zero_remembers_nothing() {
        let cache = VerifiedChains::new(0);
        cache.put(keys(b"leaf", b"ca"), 100, 200);
        assert!(!cache.holds(&keys(b"leaf", b"ca"), 150));
        assert_eq!(cache.settled_len(), 0);
    }
}
