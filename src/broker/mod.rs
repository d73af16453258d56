//! The loaded broker: everything the server needs, validated, built once per (re)load.
//!
//! `serve`, `check-config`, `verify-cert` and `jwks` all go through [`Broker::build`] and
//! [`Broker::authenticate`], so the CLI can never disagree with the server.

mod issue;
mod report;
mod verified;

pub use issue::{Decided, IssueError};
pub use verified::{ChainKeys, VerifiedChains};

use std::fmt;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::Serialize;
use serde_json::{json, Value};

use crate::cache::TokenCache;
use crate::claims::{self, Subject};
use crate::clients::{ClientRule, ClientRules};
use crate::clock::rfc3339;
use crate::config::{Config, RevocationPolicy, SignerConfig, MAX_TOKEN_TTL};
use crate::crl::{self, KeptStamp};
use crate::flows::{self, FlowDeps, Registry};
use crate::google::Google;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::pem;
use crate::proxy::ProxyPolicy;
use crate::signer::{IamSigner, LocalSigner, Signer, SignerError};
use crate::tls;
use crate::trust::{Refusal, TrustError, TrustStore};

/// Every problem found while loading, so an operator fixes them all in one go.
#[derive(Debug)]
pub struct Problems(pub Vec<String>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for Problems {}

pub struct Broker {
    config: Config,
    /// Chains validated by this build's trust store.
    verified: VerifiedChains,
    /// Survives reloads: replacing it would cost every device an upstream call.
    cache: Arc<TokenCache>,
    proxy: ProxyPolicy,
    trust: TrustStore,
    rules: ClientRules,
    signer: Arc<dyn Signer>,
    flows: Registry,
    tls: Arc<rustls::ServerConfig>,
    metrics: Arc<Metrics>,
    /// Which version of each CRL source's kept copy this build read (`None`: none was
    /// there), to notice a download this build does not enforce.
    kept_stamps: Vec<(String, Option<KeptStamp>)>,
    /// Pre-rendered public documents: served on every request, never change until reload.
    discovery: Bytes,
    jwks: Bytes,
}

/// A certificate that passed validation and matched a client rule.
pub struct Authenticated<'a> {
    pub identity: Arc<Identity>,
    pub rule: &'a ClientRule,
    pub subject: String,
}

impl Broker {
    /// Loads every file the config names and checks every setting.
    pub fn build(config: Config, metrics: Arc<Metrics>) -> Result<Broker, Problems> {
        Self::build_with(config, metrics, None)
    }

    /// A reload: the new config, the running broker's metrics, token cache and the
    /// rate-limit state of rules that stay as they were. Cached tokens are dropped when
    /// anything they were minted under changed.
    pub fn rebuild(config: Config, running: &Broker) -> Result<Broker, Problems> {
        let mut broker =
            Self::build_with(config, running.metrics.clone(), Some(running.cache.clone()))?;
        broker.rules.keep_rate_limits_of(&running.rules);
        if minted_under_changed(&running.config, &broker.config) {
            broker.cache.clear();
        }
        Ok(broker)
    }

    fn build_with(
        config: Config,
        metrics: Arc<Metrics>,
        cache: Option<Arc<TokenCache>>,
    ) -> Result<Broker, Problems> {
        let mut problems = Vec::new();
        let proxy = ProxyPolicy::new(&config.server.proxy_protocol)
            .map_err(|e| problems.push(e))
            .ok();
        problems.extend(check_settings(&config));

        let server = &config.server;
        let (trust, kept_stamps) = match load_trust(&config) {
            Ok((trust, stamps)) => (Some(trust), stamps),
            Err(e) => {
                problems.push(format!("server.client_ca/crls: {e}"));
                (None, Vec::new())
            }
        };
        let versions = tls::protocol_versions(&server.tls_versions)
            .map_err(|e| problems.push(format!("server.{e}")))
            .ok();
        let tickets = server.session_ticket_keys.as_ref().and_then(|keys| {
            crate::tickets::SharedTickets::load(&config.path(keys), server.session_ticket_lifetime)
                .map(|t| Arc::new(t) as Arc<dyn rustls::server::ProducesTickets>)
                .map_err(|e| problems.push(format!("server.session_ticket_keys: {e}")))
                .ok()
        });
        let tls = tls::server_config(
            &config.path(&server.cert),
            &config.path(&server.key),
            // With bad versions the files are still checked, to report everything at once.
            versions.as_deref().unwrap_or(rustls::DEFAULT_VERSIONS),
            trust
                .as_ref()
                .map(|t| t.root_subjects.clone())
                .unwrap_or_default(),
            tickets,
        )
        .map_err(|e| problems.push(format!("server: {e}")))
        .ok();
        let google = config.google.as_ref().and_then(|g| {
            // A key file path is relative to the config file, like every other path.
            let mut g = g.clone();
            if g.credentials != "metadata" {
                g.credentials = config.path(Path::new(&g.credentials)).display().to_string();
            }
            Google::new(&g, metrics.clone())
                .map(Arc::new)
                .map_err(|e| problems.push(e))
                .ok()
        });
        let signer = load_signer(&config, google.as_ref())
            .map_err(|e| problems.push(format!("signer: {e}")))
            .ok();
        if config.google.is_none() {
            let google_flows = flows::google_flow_names();
            for rule in &config.clients {
                for flow in rule
                    .flows
                    .iter()
                    .filter(|f| google_flows.contains(&f.as_str()))
                {
                    problems.push(format!(
                        "clients {:?}: flow {flow:?} needs a [google] section",
                        rule.name
                    ));
                }
            }
        }
        let rules = ClientRules::build(
            &config.clients,
            config.issuer.default_audience(),
            config.issuer.token_ttl,
            &flows::names(),
        )
        .map_err(|errs| problems.extend(errs))
        .ok();
        if rules.as_ref().is_some_and(ClientRules::is_empty) {
            problems.push("no [[clients]] rule: every certificate would be refused".into());
        }

        match (trust, tls, signer, rules, proxy) {
            (Some(trust), Some(tls), Some(signer), Some(rules), Some(proxy))
                if problems.is_empty() =>
            {
                let flows = Registry::build(&FlowDeps {
                    issuer: config.issuer.url.clone(),
                    signer: signer.clone(),
                    google: google.clone(),
                });
                let cache = cache.unwrap_or_else(|| {
                    let (capacity, margin) = config.token_cache();
                    Arc::new(TokenCache::new(capacity, margin, metrics.clone()))
                });
                let discovery = discovery_document(&config, signer.as_ref(), &flows);
                let jwks = Bytes::from(signer.jwks().map(Value::to_string).unwrap_or_default());
                let broker = Broker {
                    verified: VerifiedChains::new(config.server.verified_chain_cache),
                    config,
                    cache,
                    proxy,
                    trust,
                    rules,
                    signer,
                    flows,
                    tls: Arc::new(tls),
                    metrics,
                    kept_stamps,
                    discovery,
                    jwks,
                };
                broker.update_gauges();
                Ok(broker)
            }
            _ => Err(Problems(problems)),
        }
    }

    /// The configuration this broker was built from.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The client CA bundle and CRLs of this build.
    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The TLS configuration the listener hands new connections.
    pub fn tls(&self) -> Arc<rustls::ServerConfig> {
        self.tls.clone()
    }

    /// Who may send a PROXY header.
    pub fn proxy(&self) -> &ProxyPolicy {
        &self.proxy
    }

    /// The discovery document and the JWKS, rendered once per build.
    pub fn public_documents(&self) -> (&Bytes, &Bytes) {
        (&self.discovery, &self.jwks)
    }

    pub fn signer(&self) -> &dyn Signer {
        self.signer.as_ref()
    }

    /// The CRL sources whose kept copy on disk is not the one this build read: a download
    /// (by this process or `token-broker crl fetch`) that a reload has yet to enforce.
    pub fn kept_crls_not_loaded(&self) -> Vec<&str> {
        let Some(dir) = &self.config.server.crl_cache_dir else {
            return Vec::new();
        };
        let dir = self.config.path(dir);
        self.kept_stamps
            .iter()
            .filter(|(url, read)| crl::kept_stamp(&dir, url) != *read)
            .map(|(url, _)| url.as_str())
            .collect()
    }

    /// Which version of `url`'s kept copy this build read (`None`: none).
    pub fn kept_stamp(&self, url: &str) -> Option<KeptStamp> {
        self.kept_stamps
            .iter()
            .find(|(source, _)| source == url)
            .and_then(|(_, stamp)| *stamp)
    }

    /// The CRL sources whose kept copy is not in force: not yet loaded, not admitted, or
    /// shadowed by a newer CRL of its CA from another origin.
    pub fn kept_crls_not_in_force(&self) -> Vec<&str> {
        let mut sources = self.kept_crls_not_loaded();
        for status in self.trust.crl_statuses() {
            let needed = !status.in_force() && !status.redundant;
            if status.fetched && needed && !sources.contains(&status.source.as_str()) {
                sources.push(&status.source);
            }
        }
        sources
    }

    /// Forgets rate-limit state of certificates not seen for a while.
    pub fn tidy_rate_limits(&self) {
        self.rules.retain_recent();
    }

    /// Every file whose change should trigger a reload (folders expanded now).
    pub fn watched_files(&self) -> Vec<std::path::PathBuf> {
        let config = &self.config;
        let server = &config.server;
        let mut files = vec![
            config.source.clone(),
            config.path(&server.cert),
            config.path(&server.key),
        ];
        files.extend(server.crls.iter().map(|p| config.path(p)));
        files.extend(server.session_ticket_keys.iter().map(|p| config.path(p)));
        let mut folders = vec![config.path(&server.client_ca)];
        if let SignerConfig::Local { key_dir, .. } = &config.signer {
            folders.push(config.path(key_dir));
        }
        for folder in folders {
            match std::fs::read_dir(&folder) {
                Ok(entries) => {
                    let mut inside: Vec<_> =
                        entries.filter_map(Result::ok).map(|e| e.path()).collect();
                    inside.sort();
                    files.extend(inside);
                }
                Err(_) => files.push(folder),
            }
        }
        if let Some(google) = &config.google {
            if google.credentials != "metadata" {
                files.push(config.path(Path::new(&google.credentials)));
            }
        }
        files
    }

    /// What an operator should know of this configuration at `now` that does not stop it
    /// loading: `check-config` prints these, `serve` logs them at start and on reload.
    pub fn warnings(&self, now: i64) -> Vec<String> {
        let trust = &self.trust;
        let mut warnings = Vec::new();
        if trust.crl_count() == 0 && trust.revocation() == RevocationPolicy::BestEffort {
            warnings.push("no CRL is configured (server.crls): revocation is off, a revoked device certificate gets tokens until it expires".into());
        } else {
            let unchecked = trust.cas_without_crl();
            if !unchecked.is_empty() {
                let what = match trust.revocation() {
                    RevocationPolicy::BestEffort => "server.revocation = \"best-effort\": the revocation of certificates issued by these CAs is not checked, as no CRL names them",
                    RevocationPolicy::Require => "these CAs have no CRL: server.revocation = \"require\" refuses every certificate they issued (crl_missing)",
                };
                warnings.push(format!("{what}: {}", unchecked.join("; ")));
            }
        }
        if let Some(google) = &self.config.google {
            let provider = google.subject_token_audience();
            for rule in self
                .config
                .clients
                .iter()
                .filter(|r| r.audiences.contains(&provider))
            {
                warnings.push(format!(
                    "clients {:?}: audiences lists the Google provider audience {provider:?}, so its devices can exchange their broker tokens at Google STS themselves, for whatever the pool's IAM bindings allow, outside the rule's scopes and service_accounts (meant for executable-sourced credentials, docs/devices.md; remove it otherwise)",
                    rule.name
                ));
            }
        }
        warnings.extend(google_resource_audiences(&self.config));
        let cas: Vec<&str> = trust.cas.iter().map(|ca| ca.subject.as_str()).collect();
        for (rule, patterns) in self.rules.issuers_matching_none(&cas) {
            warnings.push(format!(
                "clients {rule:?}: match.issuer {patterns:?} matches no CA of server.client_ca, so only devices sending an intermediate of their own can match it; distinguished names are RFC 4514 text, most specific first, as this report prints them: {}",
                cas.join("; ")
            ));
        }
        if let Some(due) = self.signer.key_expiry().filter(|due| *due <= now) {
            warnings.push(format!(
                "the active signing key reached signer.rotate_after at {} (the TokenBrokerSigningKeyRotationOverdue alert fires): add its successor to key_dir, dated ahead (signing-key rotation, examples/deploy/README.md)",
                rfc3339(due)
            ));
        }
        for url in trust.unfetched_sources() {
            warnings.push(format!(
                "CRL source {url} has no admitted kept copy yet: until a download of it is admitted, the certificates it would cover are refused (crl_missing) or, under best-effort, unchecked; `token-broker crl fetch` downloads it now and says why it fails"
            ));
        }
        for status in trust.crl_statuses().iter().filter(|s| s.crl.is_none()) {
            if let Some(why) = &status.shadowed_by {
                warnings.push(format!(
                    "the kept copy of CRL source {} is {why}; it is replaced by the next admitted download",
                    status.source
                ));
            }
        }
        warnings.extend(self.expired_crls(now));
        for ca in trust.cas.iter().filter(|ca| ca.is_root) {
            if ca.not_after <= now {
                warnings.push(format!(
                    "root CA {} expired at {}: every chain it anchors is refused (expired)",
                    ca.subject,
                    rfc3339(ca.not_after)
                ));
            } else if ca.not_after - now < ROOT_EXPIRY_WARNING {
                warnings.push(format!(
                    "root CA {} expires at {} (in {} days): every chain it anchors will be refused then; add its successor to server.client_ca now",
                    ca.subject,
                    rfc3339(ca.not_after),
                    (ca.not_after - now) / 86_400
                ));
            }
        }
        warnings
    }

    /// Each loaded CRL past its nextUpdate at `now`, said for an operator: under either
    /// `server.revocation` the certificates it covers are refused until it is renewed.
    pub fn expired_crls(&self, now: i64) -> Vec<String> {
        self.trust
            .crls()
            .filter_map(|crl| {
                let next = crl.next_update.filter(|next| *next <= now)?;
                Some(format!(
                    "CRL {} of {} expired at {}: certificates it covers are refused (crl_expired) until it is renewed",
                    crl.source, crl.issuer, rfc3339(next)
                ))
            })
            .collect()
    }

    /// Gauges that move with time rather than with requests.
    pub fn update_gauges(&self) {
        if let Some(earliest) = self.trust.cas.iter().map(|c| c.not_after).min() {
            self.metrics.ca_cert_expiry.set(earliest as f64);
        }
        let metrics = &self.metrics;
        metrics.crl_this_update.reset();
        metrics.crl_next_update.reset();
        for crl in self.trust.crls() {
            let source = [crl.source.as_str()];
            metrics
                .crl_this_update
                .with_label_values(&source)
                .set(crl.this_update as f64);
            if let Some(next) = crl.next_update {
                metrics
                    .crl_next_update
                    .with_label_values(&source)
                    .set(next as f64);
            }
        }
        if let Some(expiry) = self.signer.key_expiry() {
            self.metrics.signing_key_expiry.set(expiry as f64);
        }
    }

    /// Validates a presented chain at `now` and finds its client rule: the whole decision
    /// about *who* is asking, shared by `/token` and `verify-cert`.
    /// A chain this build already validated is not validated again while its verdict
    /// provably holds (see [`VerifiedChains`]); rule matching always runs again.
    pub fn authenticate(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Authenticated<'_>, Refusal> {
        self.authenticate_parsed(chain, now, &OnceLock::new())
    }

    /// [`Broker::authenticate`] for a connection's requests. A verified-chain hit brings the
    /// leaf's identity with its verdict; otherwise (a miss, or the cache off) the leaf is
    /// parsed at most once into `parsed`, which the connection keeps: the identity depends on
    /// the leaf's bytes alone, the verdict on it is still looked up (or reached) on every
    /// request.
    pub fn authenticate_parsed(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
        parsed: &OnceLock<Arc<Identity>>,
    ) -> Result<Authenticated<'_>, Refusal> {
        let (leaf, others) = chain.split_first().ok_or(Refusal::NoCertificate)?;
        let seconds = now.as_secs() as i64;
        let keys = ChainKeys::of(leaf, others);
        let identity = if let Some(identity) = self.verified.holds(&keys, seconds) {
            self.metrics.verified_chain_hits.inc();
            identity
        } else {
            self.metrics.verified_chain_misses.inc();
            let identity = match parsed.get() {
                Some(identity) => identity.clone(),
                None => {
                    let identity = Arc::new(
                        Identity::from_der(leaf).map_err(|e| Refusal::Malformed(e.to_string()))?,
                    );
                    parsed.get_or_init(|| identity.clone()).clone()
                }
            };
            let valid_until = self.trust.verify(chain, &identity, now)?;
            self.verified
                .put(keys, identity.clone(), seconds, valid_until);
            identity
        };
        let (rule, matched) = self.rules.find(&identity).ok_or(Refusal::NoMatchingRule)?;
        let subject = rule.subject_for(&identity, &matched)?;
        Ok(Authenticated {
            identity,
            rule,
            subject,
        })
    }

    /// `verify-cert`'s report: the server's decision plus what a token would carry (for the
    /// default audience if the rule allows it, else for the rule's first audience).
    pub fn explain(&self, chain: &[CertificateDer<'_>], at: UnixTime) -> Decision {
        match self.authenticate(chain, at) {
            Ok(auth) => {
                let default = self.config.issuer.default_audience();
                let audience = match auth.rule.audiences.iter().find(|a| *a == default) {
                    Some(a) => a.as_str(),
                    None => auth.rule.audiences[0].as_str(),
                };
                let who = Subject {
                    identity: &auth.identity,
                    rule: auth.rule,
                    subject: &auth.subject,
                    audience,
                };
                let claims = claims::id_token_claims(
                    &self.config.issuer.url,
                    &who,
                    flows::mtls_client_credentials::NAME,
                    at.as_secs() as i64,
                    "(unique per token)",
                );
                let claims = serde_json::to_value(claims).ok();
                Decision {
                    accepted: true,
                    reason: None,
                    description: None,
                    identity: Some(Identity::clone(&auth.identity)),
                    rule: Some(auth.rule.name.clone()),
                    rules: None,
                    claims,
                }
            }
            Err(refusal) => {
                let identity = chain.first().and_then(|c| Identity::from_der(c).ok());
                // No rule took a trusted certificate: per rule, the first condition it failed.
                let rules = match (&refusal, &identity) {
                    (Refusal::NoMatchingRule, Some(identity)) => Some(
                        self.rules
                            .misses(identity)
                            .into_iter()
                            .map(|(rule, failed)| RuleMiss { rule, failed })
                            .collect(),
                    ),
                    _ => None,
                };
                Decision {
                    accepted: false,
                    reason: Some(refusal.reason()),
                    description: Some(refusal.to_string()),
                    identity,
                    rule: None,
                    rules,
                    claims: None,
                }
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Decision {
    pub accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub identity: Option<Identity>,
    pub rule: Option<String>,
    /// `no_matching_rule`: each rule, in order, with the first of its conditions that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<RuleMiss>>,
    pub claims: Option<Value>,
}

/// A rule that did not take the certificate, and why.
#[derive(Debug, Serialize)]
pub struct RuleMiss {
    pub rule: String,
    pub failed: String,
}

/// How long before a root expires `check-config` starts warning.
const ROOT_EXPIRY_WARNING: i64 = 30 * 86_400;

/// The client CA bundle, every CRL file the config names and the kept copies of its CRL
/// sources, with which version of each kept copy was read.
type KeptStamps = Vec<(String, Option<KeptStamp>)>;

fn load_trust(config: &Config) -> Result<(TrustStore, KeptStamps), TrustError> {
    let server = &config.server;
    let mut files = Vec::new();
    for path in &server.crls {
        files.extend(pem::crls(&config.path(path))?);
    }
    let mut kept = Vec::new();
    let mut stamps = Vec::new();
    if let Some(dir) = &server.crl_cache_dir {
        for source in &server.crl_sources {
            let copy = crl::kept(&config.path(dir), &source.url)?;
            stamps.push((source.url.clone(), copy.as_ref().map(|c| c.stamp)));
            kept.extend(copy);
        }
    }
    let sources: Vec<String> = server.crl_sources.iter().map(|s| s.url.clone()).collect();
    let trust = TrustStore::load(
        &config.path(&server.client_ca),
        files,
        kept,
        &sources,
        &server.client_ca_pins,
        server.revocation(),
    )?;
    Ok((trust, stamps))
}

/// The configured token signer.
pub fn load_signer(
    config: &Config,
    google: Option<&Arc<Google>>,
) -> Result<Arc<dyn Signer>, SignerError> {
    match &config.signer {
        SignerConfig::Local {
            key_dir,
            rotate_after,
        } => Ok(Arc::new(LocalSigner::load(
            &config.path(key_dir),
            *rotate_after,
        )?)),
        SignerConfig::Iam {
            service_account,
            jwks_url,
        } => {
            let google = google.ok_or_else(|| {
                SignerError::Key("kind = \"iam\" needs a [google] section".into())
            })?;
            Ok(Arc::new(IamSigner::new(
                google.clone(),
                service_account,
                jwks_url.as_deref(),
            )))
        }
    }
}

/// Whether a token minted under `old` may differ from one minted under `new` (issuer,
/// signer, Google settings or client rules changed). Public for the config fuzz target.
pub fn minted_under_changed(old: &Config, new: &Config) -> bool {
    // JSON, not TOML: TOML has no form for a bare tuple, so both sides would be "".
    let minted_under =
        |c: &Config| serde_json::to_value((&c.issuer, &c.signer, &c.google, &c.clients));
    match (minted_under(old), minted_under(new)) {
        (Ok(old), Ok(new)) => old != new,
        // A value that cannot be compared counts as changed: a refetch costs little.
        _ => true,
    }
}

/// The checks of settings that need no file: issuer, limits, `[google]` timings, admin
/// listener. [`Broker::build`] runs them first; public for the config fuzz target.
pub fn check_settings(config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    check_issuer(config, &mut problems);
    check_limits(&config.server, &mut problems);
    check_crl_sources(&config.server, &mut problems);
    if let Some(google) = &config.google {
        check_google(google, &mut problems);
    }
    if !config.admin.listen.is_empty()
        && config.admin.listen.parse::<std::net::SocketAddr>().is_err()
    {
        problems.push(format!(
            "admin.listen: {:?} is not an address:port (use \"\" to disable)",
            config.admin.listen
        ));
    }
    if let Some(path) = config.audit_path() {
        // Opening it is `serve`'s; what can be told from here fails the load (or reload).
        let folder = path.parent().filter(|p| !p.as_os_str().is_empty());
        if path.is_dir() {
            problems.push(format!("audit.path: {} is a folder", path.display()));
        } else if folder.is_some_and(|f| !f.is_dir()) {
            problems.push(format!(
                "audit.path: the folder of {} does not exist",
                path.display()
            ));
        }
    }
    problems
}

/// Limits outside these bounds break the server (zero timeouts) or overflow (huge ones).
fn check_limits(server: &crate::config::ServerConfig, problems: &mut Vec<String>) {
    use std::time::Duration;
    let (second, hour) = (Duration::from_secs(1), Duration::from_secs(3600));
    for (name, value) in [
        ("handshake_timeout", server.handshake_timeout),
        ("request_header_timeout", server.request_header_timeout),
    ] {
        if value < second || value > hour {
            problems.push(format!("server.{name} must be between 1s and 1h"));
        }
    }
    // RFC 8446 4.6.1: a ticket lifetime is at most 7 days.
    let lifetime = server.session_ticket_lifetime;
    if lifetime < Duration::from_secs(60) || lifetime > Duration::from_secs(7 * 86_400) {
        problems.push("server.session_ticket_lifetime must be between 1m and 7d".into());
    }
    if !(1..=1_000_000).contains(&server.max_connections) {
        problems.push("server.max_connections must be between 1 and 1000000".into());
    }
    if !(1..=1024 * 1024).contains(&server.max_body_bytes) {
        problems.push("server.max_body_bytes must be between 1 and 1048576".into());
    }
    let proxy_timeout = server.proxy_protocol.header_timeout;
    if proxy_timeout < Duration::from_millis(100) || proxy_timeout > Duration::from_secs(60) {
        problems.push("server.proxy_protocol.header_timeout must be between 100ms and 60s".into());
    }
    if server.shutdown_delay > Duration::from_secs(300) {
        problems.push("server.shutdown_delay must be at most 5m (load balancers notice a failing /readyz within seconds)".into());
    }
    if server.shutdown_grace > hour {
        problems.push("server.shutdown_grace must be at most 1h".into());
    }
    if !server.reload_interval.is_zero()
        && (server.reload_interval < second || server.reload_interval > hour)
    {
        problems
            .push("server.reload_interval must be 0s (SIGHUP only) or between 1s and 1h".into());
    }
}

/// Google timings outside these bounds disable Google or overflow clocks.
fn check_crl_sources(server: &crate::config::ServerConfig, problems: &mut Vec<String>) {
    if server.crl_sources.is_empty() {
        if server.crls.is_empty() && server.revocation == Some(RevocationPolicy::Require) {
            problems.push("server.revocation = \"require\" but neither server.crls nor server.crl_sources is configured: every device would be refused (crl_missing)".into());
        }
        return;
    }
    if server.crl_cache_dir.is_none() {
        problems.push("server.crl_cache_dir: required with server.crl_sources (fetched CRLs are kept there for restarts without network)".into());
    }
    let mut seen = std::collections::HashSet::new();
    for source in server
        .crl_sources
        .iter()
        .filter(|s| !seen.insert(s.url.as_str()))
    {
        problems.push(format!(
            "server.crl_sources: {:?} is listed twice",
            source.url
        ));
    }
    for source in &server.crl_sources {
        let scheme = url::Url::parse(&source.url).map(|u| u.scheme().to_owned());
        if !matches!(scheme.as_deref(), Ok("http" | "https")) {
            problems.push(format!(
                "server.crl_sources: {:?} is not an http:// or https:// URL",
                source.url
            ));
        }
        if source.refresh.is_zero() || source.timeout.is_zero() || source.max_bytes == 0 {
            problems.push(format!(
                "server.crl_sources {:?}: refresh, timeout and max_bytes must be more than zero",
                source.url
            ));
        }
    }
}

fn check_google(google: &crate::config::GoogleConfig, problems: &mut Vec<String>) {
    use std::time::Duration;
    if google.request_timeout < Duration::from_millis(100)
        || google.request_timeout > Duration::from_secs(60)
    {
        problems.push("google.request_timeout must be between 100ms and 60s".into());
    }
    if google.deadline < google.request_timeout || google.deadline > Duration::from_secs(300) {
        problems.push("google.deadline must be at least request_timeout and at most 5m".into());
    }
    if google.access_token_lifetime < Duration::from_secs(1)
        || google.access_token_lifetime > MAX_TOKEN_TTL
    {
        problems.push("google.access_token_lifetime must be between 1s and 1h".into());
    }
    if google.refresh_margin >= google.access_token_lifetime {
        problems.push("google.refresh_margin must be shorter than access_token_lifetime".into());
    }
    if google.cache_capacity == 0 {
        problems.push("google.cache_capacity must be at least 1".into());
    }
}

fn check_issuer(config: &Config, problems: &mut Vec<String>) {
    let issuer = &config.issuer;
    match url::Url::parse(&issuer.url) {
        Ok(u) if u.scheme() != "https" => problems.push(format!(
            "issuer.url {:?} must be https (Google requires it)",
            issuer.url
        )),
        Ok(u) if u.query().is_some() || u.fragment().is_some() => problems.push(format!(
            "issuer.url {:?} must not have a query or fragment",
            issuer.url
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("issuer.url {:?}: {e}", issuer.url)),
    }
    if issuer.token_ttl.is_zero() || issuer.token_ttl > MAX_TOKEN_TTL {
        problems.push(format!(
            "issuer.token_ttl must be between 1s and 1h, got {}s",
            issuer.token_ttl.as_secs()
        ));
    }
}

/// Joins the issuer URL and a path without doubling the slash.
fn discovery_document(config: &Config, signer: &dyn Signer, flows: &Registry) -> Bytes {
    let doc = json!({
        "issuer": config.issuer.url,
        "token_endpoint": config.issuer.endpoint("/token"),
        "jwks_uri": signer.jwks_uri().map_or_else(|| config.issuer.endpoint("/jwks"), str::to_owned),
        "grant_types_supported": flows.grant_types(),
        "token_endpoint_auth_methods_supported": ["tls_client_auth"],
        "id_token_signing_alg_values_supported": signer.algorithms(),
        "subject_types_supported": ["public"],
        "response_types_supported": ["id_token"],
        "claims_supported": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "client_id", "amr", "cnf", "client"],
        "tls_client_certificate_bound_access_tokens": true,
    });
    Bytes::from(doc.to_string())
}

/// Audiences written as a workload identity provider's resource name
/// (`//iam.googleapis.com/...`, what the broker sends STS as `audience`). Google accepts a
/// token whose `aud` is the provider's default allowed audience, `https:` + that name, which
/// `wif-setup` configures and `token --format executable` asks for: a rule allowing only the
/// resource name refuses those devices (`invalid_target`), and a token carrying it is
/// refused by STS.
fn google_resource_audiences(config: &Config) -> Vec<String> {
    let default = config
        .issuer
        .default_audience
        .iter()
        .map(|audience| ("issuer.default_audience".to_owned(), audience));
    let rules = config.clients.iter().flat_map(|rule| {
        rule.audiences
            .iter()
            .map(move |audience| (format!("clients {:?}: audiences", rule.name), audience))
    });
    default
        .chain(rules)
        .filter(|(_, audience)| audience.starts_with("//iam.googleapis.com/"))
        .map(|(place, audience)| {
            format!(
                "{place}: {audience:?} is the provider's resource name, not an audience Google accepts in a token; write \"https:{audience}\", the provider's default allowed audience (what wif-setup configures and `token --format executable` asks for)"
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{check_settings, minted_under_changed};
    use crate::config::Config;

    const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
cert = "s.pem"
key = "k.pem"
client_ca = "ca.pem"
[issuer]
url = "https://broker.example"
[signer]
kind = "local"
key_dir = "keys"
[[clients]]
name = "devices"
match = { spiffe = ["spiffe://example.org/device/*"] }
claims = { fleet = "one", since = 1979-05-27T07:32:00Z }
ttl = "10m"
"#;

    #[test]
    fn what_tokens_are_minted_under_is_compared_section_by_section() {
        let config = Config::parse(CONFIG).unwrap();
        assert!(!minted_under_changed(&config, &config.clone()));
        let mut server_only = config.clone();
        server_only.server.max_connections += 1;
        assert!(!minted_under_changed(&config, &server_only));
        for change in [
            CONFIG.replace("fleet = \"one\"", "fleet = \"two\""),
            CONFIG.replace("ttl = \"10m\"", "ttl = \"20m\""),
            CONFIG.replace("[[clients]]", "[[clients]]\nsubject = \"{cn}\""),
            CONFIG.replace("broker.example", "broker.example/v2"),
            CONFIG.replace("\"keys\"", "\"other-keys\""),
            format!(
                "{CONFIG}[google]\nproject_number = \"1\"\npool_id = \"p\"\nprovider_id = \"r\"\n"
            ),
        ] {
            let changed = Config::parse(&change).unwrap();
            assert!(minted_under_changed(&config, &changed), "{change}");
        }
    }
    #[test]
    fn shutdown_delay_is_at_most_five_minutes() {
        let with_delay = |delay: &str| {
            let text = CONFIG.replace(
                "[issuer]",
                &format!("shutdown_delay = \"{delay}\"\n[issuer]"),
            );
            check_settings(&Config::parse(&text).unwrap())
        };
        assert_eq!(
            Config::parse(CONFIG)
                .unwrap()
                .server
                .shutdown_delay
                .as_secs(),
            5
        );
        for fine in ["0s", "5s", "5m"] {
            assert!(
                with_delay(fine).is_empty(),
                "{fine}: {:?}",
                with_delay(fine)
            );
        }
        assert_eq!(
            with_delay("301s"),
            ["server.shutdown_delay must be at most 5m (load balancers notice a failing /readyz within seconds)"]
        );
    }
}
