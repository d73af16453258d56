//! The configuration contract (`config.toml`).
//!
//! Parsing is strict (`deny_unknown_fields`) so that a typo is an error rather than a
//! silently ignored setting. Relative paths are resolved against the config file's folder,
//! so the server behaves the same whatever directory it is started from.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(crate) mod defaults;
mod duration;
mod pin;

pub use duration::parse_duration;
pub use pin::SpkiPin;

use serde::{Deserialize, Serialize};

/// Longest token lifetime the broker will issue: Google STS accepts up to 48h, but a
/// stolen token should be useless soon.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("there is no config file {path}: name one with -c FILE or TOKEN_BROKER_CONFIG, or write a starting one beside a development PKI with `token-broker init --config {path}`")]
    Missing { path: PathBuf },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Left out of the effective config (`check-config`) when empty, as is `audit`.
    #[serde(default, skip_serializing_if = "DevConfig::is_empty")]
    pub dev: DevConfig,
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub issuer: IssuerConfig,
    pub signer: SignerConfig,
    /// Google Cloud: Workload Identity Federation and IAM Credentials (Google flows, IAM signer).
    pub google: Option<GoogleConfig>,
    #[serde(default)]
    pub clients: Vec<ClientRuleConfig>,
    #[serde(default, skip_serializing_if = "AuditConfig::is_empty")]
    pub audit: AuditConfig,
    /// Folder of the config file; relative paths are resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself (watched for changes).
    #[serde(skip)]
    pub source: PathBuf,
}

/// Development conveniences; none of these belong in a production config.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DevConfig {
    /// When set and the folder does not exist, `serve` creates a development PKI there.
    pub pki_dir: Option<PathBuf>,
}

impl DevConfig {
    fn is_empty(&self) -> bool {
        self.pki_dir.is_none()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Server certificate chain (leaf first), PEM.
    pub cert: PathBuf,
    /// Server private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// Trusted client CA bundle: a PEM file or a folder of PEM files.
    pub client_ca: PathBuf,
    /// CRL files for the client CAs: PEM (any number of CRLs per file), DER (one), or
    /// folders of them.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// CRLs the broker downloads and refreshes itself (configured URLs only, never URLs
    /// named by the certificates devices send).
    #[serde(default)]
    pub crl_sources: Vec<CrlSourceConfig>,
    /// Where fetched CRLs are kept, so a restart without network still has them.
    pub crl_cache_dir: Option<PathBuf>,
    /// What to do with a certificate whose issuer has no CRL; default `require` when any
    /// CRL is configured (as files or as sources), else revocation is not checked.
    pub revocation: Option<RevocationPolicy>,
    /// Pins of the client CA roots' public keys; when given, every root of `client_ca`
    /// must match one, so a CA dropped into the bundle is never trusted by accident.
    #[serde(default)]
    pub client_ca_pins: Vec<SpkiPin>,
    #[serde(default = "defaults::tls_versions")]
    pub tls_versions: Vec<String>,
    #[serde(default = "defaults::handshake_timeout", with = "duration::text")]
    pub handshake_timeout: Duration,
    /// Time a client has to send a request's headers; on a keep-alive connection it runs
    /// from the end of the previous response, so it is also the idle timeout.
    #[serde(default = "defaults::header_timeout", with = "duration::text")]
    pub request_header_timeout: Duration,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// How many device certificates' chain verdicts to remember (0: validate every request).
    #[serde(default = "defaults::verified_chain_cache")]
    pub verified_chain_cache: usize,
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Largest request head (request line and headers).
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    /// After SIGTERM/SIGINT: `/readyz` fails but new connections are still accepted this
    /// long, so load balancers stop sending before the listener closes.
    #[serde(default = "defaults::shutdown_delay", with = "duration::text")]
    pub shutdown_delay: Duration,
    /// After SIGTERM/SIGINT: in-flight requests get this long before the process exits.
    #[serde(default = "defaults::shutdown_grace", with = "duration::text")]
    pub shutdown_grace: Duration,
    /// How often watched files are checked for changes; "0s" reloads on SIGHUP only.
    #[serde(default = "defaults::reload_interval", with = "duration::text")]
    pub reload_interval: Duration,
    /// Keys of the TLS session tickets, shared by every replica (`tickets`); without it a
    /// replica resumes only sessions it remembers itself.
    pub session_ticket_keys: Option<PathBuf>,
    /// Longest a session ticket is accepted after it was issued; rotate the key file at
    /// least this often.
    #[serde(default = "defaults::session_ticket_lifetime", with = "duration::text")]
    pub session_ticket_lifetime: Duration,
    #[serde(default)]
    pub proxy_protocol: ProxyProtocolConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CrlSourceConfig {
    /// `http://` or `https://` (public roots) URL of one CRL (DER or PEM).
    pub url: String,
    /// How often to download it again; it is also fetched before its nextUpdate.
    #[serde(default = "defaults::crl_refresh", with = "duration::text")]
    pub refresh: Duration,
    /// Time for one download, connection included.
    #[serde(default = "defaults::crl_timeout", with = "duration::text")]
    pub timeout: Duration,
    /// Largest CRL accepted.
    #[serde(default = "defaults::crl_max_bytes")]
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RevocationPolicy {
    /// Every CA that issued a certificate of the path must have a current CRL.
    Require,
    /// A certificate whose issuer has no CRL is accepted.
    BestEffort,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    #[serde(default)]
    pub mode: ProxyMode,
    /// Peers that may (and, with v2, must) send a PROXY header; no one else may.
    #[serde(default)]
    pub trusted_cidrs: Vec<String>,
    /// Time a trusted peer has to send the PROXY header.
    #[serde(default = "defaults::proxy_header_timeout", with = "duration::text")]
    pub header_timeout: Duration,
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        Self {
            mode: ProxyMode::Off,
            trusted_cidrs: Vec::new(),
            header_timeout: defaults::proxy_header_timeout(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    #[default]
    Off,
    V2,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Plain-HTTP listener for `/metrics`, `/healthz`, `/readyz`; empty string disables it.
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: defaults::admin_listen(),
        }
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A file of their own (appended, reopened on SIGHUP); without it they go to stderr.
    pub path: Option<PathBuf>,
}

impl AuditConfig {
    fn is_empty(&self) -> bool {
        self.path.is_none()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` claim; published byte-identical in discovery.
    pub url: String,
    #[serde(default = "defaults::token_ttl", with = "duration::text")]
    pub token_ttl: Duration,
    /// Audience used when a request names none; defaults to the issuer URL.
    pub default_audience: Option<String>,
}

impl IssuerConfig {
    pub fn default_audience(&self) -> &str {
        self.default_audience.as_deref().unwrap_or(&self.url)
    }

    /// The URL of one of the broker's endpoints (`/token`, `/jwks`) under the issuer.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.url.trim_end_matches('/'))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum SignerConfig {
    /// PEM private keys in `key_dir` (see `signer::LocalSigner` for which one signs).
    Local {
        key_dir: PathBuf,
        /// Age after which the active key should be rotated (drives an alerting metric).
        #[serde(default = "defaults::rotate_after", with = "duration::text")]
        rotate_after: Duration,
    },
    /// Google IAM Credentials `signJwt` as `service_account` (needs `[google]`).
    Iam {
        service_account: String,
        /// Public keys of that service account; default Google's JWKS URL for it.
        jwks_url: Option<String>,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GoogleConfig {
    pub project_number: String,
    pub pool_id: String,
    pub provider_id: String,
    /// The broker's own Google credentials: "metadata" or a service-account key file.
    #[serde(default = "defaults::credentials")]
    pub credentials: String,
    /// `aud` of the broker token exchanged at STS; default: the provider's URL.
    pub subject_token_audience: Option<String>,
    #[serde(default = "defaults::sts_url")]
    pub sts_url: String,
    #[serde(default = "defaults::iam_credentials_url")]
    pub iam_credentials_url: String,
    #[serde(default = "defaults::metadata_url")]
    pub metadata_url: String,
    /// Timeout of one upstream HTTP request.
    #[serde(default = "defaults::request_timeout", with = "duration::text")]
    pub request_timeout: Duration,
    /// Total time for one upstream call including retries; a device never waits longer.
    #[serde(default = "defaults::upstream_deadline", with = "duration::text")]
    pub deadline: Duration,
    /// Cached tokens are replaced this long before they expire.
    #[serde(default = "defaults::refresh_margin", with = "duration::text")]
    pub refresh_margin: Duration,
    /// Most tokens kept in the cache.
    #[serde(default = "defaults::cache_capacity")]
    pub cache_capacity: u64,
    /// Lifetime asked of `generateAccessToken` (at most 1h).
    #[serde(default = "defaults::access_token_lifetime", with = "duration::text")]
    pub access_token_lifetime: Duration,
}

impl GoogleConfig {
    /// `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/R`
    pub fn provider_resource(&self) -> String {
        format!(
            "//iam.googleapis.com/projects/{}/locations/global/workloadIdentityPools/{}/providers/{}",
            self.project_number, self.pool_id, self.provider_id
        )
    }

    /// The provider's default allowed audience, which the broker token carries for STS.
    pub fn subject_token_audience(&self) -> String {
        self.subject_token_audience
            .clone()
            .unwrap_or_else(|| format!("https:{}", self.provider_resource()))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientRuleConfig {
    pub name: String,
    /// The OAuth client id of matching devices (RFC 8705); defaults to `name`.
    pub client_id: Option<String>,
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    /// Template for `sub`, e.g. `"device:{cn}"`; default: SPIFFE ID, URI SAN, DNS SAN, subject DN.
    pub subject: Option<String>,
    /// Audiences this client may request; empty means only the issuer's default audience.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Flow names this client may use.
    #[serde(default = "defaults::flows")]
    pub flows: Vec<String>,
    /// Google service accounts this client may impersonate (Google flows).
    #[serde(default)]
    pub service_accounts: Vec<String>,
    /// Google OAuth scopes this client may request (Google flows).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Audiences of Google-signed ID tokens this client may request (`google-id-token`).
    #[serde(default)]
    pub target_audiences: Vec<String>,
    /// Extra static claims added to the broker's ID token.
    #[serde(default)]
    pub claims: BTreeMap<String, toml::Value>,
    /// Token lifetime for this client, at most the 1h maximum.
    #[serde(default, with = "duration::optional_text")]
    pub ttl: Option<Duration>,
    /// Token requests allowed per certificate under this rule.
    pub rate_limit: Option<RateLimitConfig>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_minute: u32,
    /// Requests allowed at once before the rate applies (default: requests_per_minute).
    pub burst: Option<u32>,
}

/// Conditions a certificate must meet; every field given must match (AND), and within a
/// field any one pattern suffices (OR). A rule without any is an error: the explicit
/// catch-all is `subject = ["**"]` (`clients::CATCH_ALL`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub spiffe: Option<Vec<String>>,
    pub uri: Option<Vec<String>>,
    pub dns: Option<Vec<String>>,
    pub email: Option<Vec<String>>,
    pub subject: Option<Vec<String>>,
    pub issuer: Option<Vec<String>>,
    /// Exact SHA-256 certificate fingerprints (hex, colons optional).
    pub sha256: Option<Vec<String>>,
}

impl ServerConfig {
    /// The revocation policy in force: as configured, else `require` whenever CRLs are.
    pub fn revocation(&self) -> RevocationPolicy {
        self.revocation
            .unwrap_or(if self.crls.is_empty() && self.crl_sources.is_empty() {
                RevocationPolicy::BestEffort
            } else {
                RevocationPolicy::Require
            })
    }
}

impl Config {
    /// Reads and parses the file; semantic checks happen when the broker is built.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ConfigError::Missing {
                    path: path.to_owned(),
                }
            } else {
                ConfigError::Read {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        config.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        config.source = path.to_path_buf();
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// The token cache's capacity and refresh margin: `[google]`'s, else the defaults.
    pub fn token_cache(&self) -> (u64, Duration) {
        self.google.as_ref().map_or(
            (defaults::cache_capacity(), defaults::refresh_margin()),
            |g| (g.cache_capacity, g.refresh_margin),
        )
    }

    /// The audit file, resolved, if one is configured.
    pub fn audit_path(&self) -> Option<PathBuf> {
        self.audit.path.as_deref().map(|p| self.path(p))
    }

    /// Resolves a configured path against the config file's folder.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() || self.base_dir.as_os_str().is_empty() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_friendly_and_iso_forms() {
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("PT10S").unwrap(), Duration::from_secs(10));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        assert!(parse_duration("-5m").is_err());
        assert!(parse_duration("soon").is_err());
    }

    /// The shipped configs stay parseable as the contract evolves.
    #[test]
    fn shipped_configs_parse() {
        for file in ["config.toml", "examples/production.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let config = Config::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(!config.clients.is_empty(), "{file}");
        }
    }

    #[test]
    fn pins_parse_strictly_and_print_as_written() {
        let text = "sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
        let pin: SpkiPin = text.parse().unwrap();
        assert_eq!(pin.to_string(), text);
        for bad in [
            "",
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
            "sha1/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
            "SHA256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
            "sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU",
            "sha256/47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU=",
            "sha256/AAAA",
            "sha256/ 47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
        ] {
            assert!(bad.parse::<SpkiPin>().is_err(), "{bad:?}");
        }
        let err = Config::parse(
            "[server]\nlisten='127.0.0.1:1'\ncert='a'\nkey='b'\nclient_ca='c'\n\
             client_ca_pins=['sha256/AAAA']\n\
             [issuer]\nurl='https://x'\n[signer]\nkind='local'\nkey_dir='k'\n",
        )
        .unwrap_err();
        assert!(
            err.contains("invalid pin") && err.contains("client_ca_pins"),
            "{err}"
        );
    }

    #[test]
    fn revocation_is_required_whenever_crls_are_configured() {
        let policy = |server: &str| {
            Config::parse(&format!(
                "[server]\nlisten='127.0.0.1:1'\ncert='a'\nkey='b'\nclient_ca='c'\n{server}\n\
                 [issuer]\nurl='https://x'\n[signer]\nkind='local'\nkey_dir='k'\n"
            ))
            .unwrap()
            .server
            .revocation()
        };
        use RevocationPolicy::{BestEffort, Require};
        assert_eq!(policy(""), BestEffort);
        assert_eq!(policy("crls=['c.pem']"), Require);
        assert_eq!(policy("crl_sources=[{url='http://x/c.crl'}]"), Require);
        assert_eq!(
            policy("crls=['c.pem']\nrevocation='best-effort'"),
            BestEffort
        );
        assert!(Config::parse(
            "[server]\nlisten='127.0.0.1:1'\ncert='a'\nkey='b'\nclient_ca='c'\nrevocation='maybe'\n\
             [issuer]\nurl='https://x'\n[signer]\nkind='local'\nkey_dir='k'\n"
        )
        .is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::parse(
            "[server]\nlisten='127.0.0.1:1'\ncert='a'\nkey='b'\nclient_ca='c'\nlisten_port=3\n\
             [issuer]\nurl='https://x'\n[signer]\nkind='local'\nkey_dir='k'\n",
        )
        .unwrap_err();
        assert!(err.contains("listen_port"), "{err}");
    }
}
