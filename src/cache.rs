//! Minted tokens, shared across identical requests.
//!
//! Google's quotas (STS about 6,000/min per project, signJwt about 60,000/min) mean upstream
//! calls must not grow with request rate: a token is served from here until `refresh_margin`
//! before it expires, and concurrent identical misses wait for one upstream call
//! (moka's `try_get_with` coalesces them). Bounded by entry count; failures are not cached.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::future::Cache;
use moka::Expiry;

use crate::clock::unix_now;
use crate::flows::{FlowError, Minted};
use crate::identity::CertDigest;
use crate::metrics::Metrics;

/// Everything that makes two requests want the same token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub cert: CertDigest,
    pub rule: String,
    pub flow: &'static str,
    pub audience: String,
    /// Sorted, so that scope order does not matter.
    pub scopes: Vec<String>,
    pub service_account: Option<String>,
    pub target_audience: Option<String>,
}

pub struct TokenCache {
    tokens: Cache<CacheKey, Minted>,
    metrics: Arc<Metrics>,
}

/// Entries live until `margin` before the token they hold expires, and at most half its
/// remaining life, so a short-lived token is still shared and never handed out nearly dead.
struct RefreshBefore {
    margin: Duration,
}

impl Expiry<CacheKey, Minted> for RefreshBefore {
    fn expire_after_create(&self, _: &CacheKey, token: &Minted, _: Instant) -> Option<Duration> {
        let left = (token.expires_at - unix_now()).max(0);
        let margin = (self.margin.as_secs() as i64).min(left / 2);
        Some(Duration::from_secs((left - margin) as u64))
    }
}

impl TokenCache {
    pub fn new(capacity: u64, margin: Duration, metrics: Arc<Metrics>) -> TokenCache {
        TokenCache {
            tokens: Cache::builder()
                .max_capacity(capacity)
                .expire_after(RefreshBefore { margin })
                .build(),
            metrics,
        }
    }

    /// Forgets every token (their rules or Google setup changed).
    pub fn clear(&self) {
        self.tokens.invalidate_all();
    }

    /// The cached token for `key`, or the one `mint` makes (once, however many ask).
    pub async fn get_or_mint(
        &self,
        key: CacheKey,
        mint: impl std::future::Future<Output = Result<Minted, FlowError>>,
    ) -> Result<Minted, FlowError> {
        let minted_here = AtomicBool::new(false);
        let result = self
            .tokens
            .try_get_with(key, async {
                minted_here.store(true, Ordering::Relaxed);
                mint.await
            })
            .await;
        if minted_here.load(Ordering::Relaxed) {
            self.metrics.cache_misses.inc();
        } else {
            self.metrics.cache_hits.inc();
        }
        result.map_err(|shared| (*shared).clone())
    }
}
