//! The verified-chain cache: chains that passed validation in this build, so a device that
//! reconnects (or sends another request on its connection) is not validated again.

use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::identity::Identity;

/// A verdict holds from when it was reached until the earliest notAfter or CRL nextUpdate
/// it depended on; nothing else in it depends on the time, and everything else it depends
/// on (bundle, CRLs, policy) belongs to this build: a reload starts empty. One entry per
/// leaf certificate, holding the verdict on the chain last sent with it: a client varying
/// what it sends beside its certificate only replaces its own entry, so only the CA, by
/// issuing certificates, adds entries. Public for `examples/chain_cache_memory.rs`, which
/// measures its memory per entry.
pub struct VerifiedChains(Option<moka::sync::Cache<[u8; 32], Arc<Verdict>>>);

struct Verdict {
    /// [`ChainKeys::chain`] of the chain that was validated.
    chain: [u8; 32],
    identity: Arc<Identity>,
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

    pub fn get(&self, keys: &ChainKeys, now: i64) -> Option<Arc<Identity>> {
        let verdict = self.0.as_ref()?.get(&keys.leaf)?;
        // A clock set back before the verification must not stretch a verdict.
        (verdict.chain == keys.chain && verdict.verified_at <= now && now < verdict.valid_until)
            .then(|| verdict.identity.clone())
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
                identity,
                verified_at,
                valid_until,
            };
            cache.insert(keys.leaf, Arc::new(verdict));
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
