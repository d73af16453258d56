//! Client rules (`[[clients]]`): which certificates are which clients, and what they may get.
//!
//! Rules are tried in order and the first match wins, so specific rules go first. Patterns
//! are globs (globset) where `*` stays within one `/`-separated segment and `**` crosses
//! segments; DNS patterns and the domain of email patterns ignore case, as those names do
//! (an email's local part is case-sensitive, RFC 5321 2.4, and is matched exactly, as name
//! constraints match it). In `subject` and
//! `issuer` patterns `\` is literal (RFC 4514 escapes with it); `[*]` is a literal `*`.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde_json::{Map, Value};

use crate::config::{ClientRuleConfig, MatchConfig, MAX_TOKEN_TTL};
use crate::identity::{CertDigest, Identity};
use crate::trust::Refusal;

/// Google's limit for `google.subject`, which is mapped from `sub`.
pub const MAX_SUBJECT_BYTES: usize = 127;

/// A static claim's TOML value as JSON. Date-times become their RFC 3339 text (serde would
/// write toml's internal `{"$__toml_private_datetime": ...}` wrapper into every token).
fn json_claim(value: &toml::Value) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .ok_or_else(|| format!("{f} has no JSON form"))?,
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(dt) => Value::String(dt.to_string()),
        toml::Value::Array(items) => {
            Value::Array(items.iter().map(json_claim).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(table) => Value::Object(
            table
                .iter()
                .map(|(k, v)| Ok((k.clone(), json_claim(v)?)))
                .collect::<Result<_, String>>()?,
        ),
    })
}

/// Claims the broker sets itself; a rule's static claims may not override them.
const RESERVED_CLAIMS: &[&str] = &[
    "iss",
    "sub",
    "aud",
    "iat",
    "nbf",
    "exp",
    "jti",
    "client_id",
    "amr",
    "cnf",
    "client",
];

#[derive(Debug)]
pub struct ClientRule {
    pub name: String,
    pub client_id: String,
    matcher: Matcher,
    subject: Option<Template>,
    /// Audiences this client may request (never empty: defaults to the issuer's default).
    pub audiences: Vec<String>,
    pub flows: Vec<String>,
    pub service_accounts: Vec<String>,
    pub scopes: Vec<String>,
    pub target_audiences: Vec<String>,
    pub claims: Map<String, Value>,
    pub ttl: Duration,
    /// Requests per certificate under this rule.
    rate_limit: Option<RateLimit>,
}

/// A rule's per-certificate rate: governor's GCRA buckets keyed by fingerprint, shared
/// with the next build's rule of the same name and quota, so a reload does not hand every
/// device a fresh burst.
#[derive(Debug)]
struct RateLimit {
    quota: governor::Quota,
    buckets: Arc<governor::DefaultKeyedRateLimiter<CertDigest>>,
}

#[derive(Debug, Default)]
struct Matcher {
    spiffe: Option<GlobSet>,
    uri: Option<GlobSet>,
    dns: Option<GlobSet>,
    email: Option<GlobSet>,
    subject: Option<GlobSet>,
    issuer: Option<GlobSet>,
    /// Held as digests, as the identity holds its own: matching compares bytes.
    sha256: Vec<CertDigest>,
    /// Each key's patterns as written, for saying why a certificate does not match.
    written: Vec<(&'static str, Vec<String>)>,
}

/// The SANs that satisfied a rule's patterns: `sub` is built from these, never from an
/// unrelated SAN the rule did not check.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Matched {
    uri: Option<String>,
    dns: Option<String>,
    email: Option<String>,
}

/// The form glob patterns see: DNS labels (and an email's domain labels) become `/`
/// segments, so `*` matches exactly one label.
fn dns_key(name: &str) -> String {
    name.replace('.', "/")
}

/// An email as patterns see it: the domain (after the last `@`) as [`dns_key`], in ASCII
/// lowercase, so that the domain ignores case and the local part does not; patterns go
/// through the same key and are matched case-sensitively.
fn email_key(address: &str) -> String {
    match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", dns_key(&domain.to_ascii_lowercase())),
        None => address.to_owned(),
    }
}

impl Matcher {
    fn matches(&self, id: &Identity) -> Option<Matched> {
        fn one(set: &Option<GlobSet>, value: Option<&str>) -> bool {
            set.as_ref()
                .is_none_or(|s| value.is_some_and(|v| s.is_match(v)))
        }
        /// `Some(first matching value)`, `Some(None)` if unconstrained, `None` if no match.
        fn any(
            set: &Option<GlobSet>,
            values: &[String],
            key: fn(&str) -> String,
        ) -> Option<Option<String>> {
            match set {
                None => Some(None),
                Some(s) => values
                    .iter()
                    .find(|v| s.is_match(key(v)))
                    .map(|v| Some(v.clone())),
            }
        }
        if !(one(&self.spiffe, id.spiffe_id.as_deref())
            && one(&self.subject, Some(&id.subject))
            && one(&self.issuer, Some(&id.issuer))
            && (self.sha256.is_empty() || self.sha256.contains(&id.sha256)))
        {
            return None;
        }
        Some(Matched {
            uri: any(&self.uri, &id.uri_sans, str::to_owned)?,
            dns: any(&self.dns, &id.dns_sans, dns_key)?,
            email: any(&self.email, &id.email_sans, email_key)?,
        })
    }
}

impl Matcher {
    /// The patterns written for `key`.
    fn written(&self, key: &str) -> &[String] {
        self.written
            .iter()
            .find(|(k, _)| *k == key)
            .map_or(&[], |(_, p)| p.as_slice())
    }

    /// The first condition `id` fails, in the order [`Matcher::matches`] checks them:
    /// the key, the certificate's value(s) and the patterns; `None` when it matches.
    fn first_mismatch(&self, id: &Identity) -> Option<String> {
        let says = |key: &str, value: String| {
            format!(
                "match.{key}: {value} matches none of {:?}",
                self.written(key)
            )
        };
        let single = [
            (
                "spiffe",
                &self.spiffe,
                id.spiffe_id.as_deref(),
                "no SPIFFE ID",
            ),
            ("subject", &self.subject, Some(id.subject.as_str()), ""),
            ("issuer", &self.issuer, Some(id.issuer.as_str()), ""),
        ];
        for (key, set, value, absent) in single {
            let Some(set) = set else { continue };
            match value {
                None => return Some(format!("match.{key}: the certificate has {absent}")),
                Some(v) if !set.is_match(v) => return Some(says(key, format!("{v:?}"))),
                Some(_) => {}
            }
        }
        if !self.sha256.is_empty() && !self.sha256.contains(&id.sha256) {
            return Some("match.sha256: the certificate's fingerprint is not listed".into());
        }
        type Sans<'a> = (
            &'a str,
            &'a Option<GlobSet>,
            &'a [String],
            fn(&str) -> String,
        );
        let several: [Sans<'_>; 3] = [
            ("uri", &self.uri, &id.uri_sans, str::to_owned),
            ("dns", &self.dns, &id.dns_sans, dns_key),
            ("email", &self.email, &id.email_sans, email_key),
        ];
        for (key, set, values, form) in several {
            let Some(set) = set else { continue };
            if values.is_empty() {
                return Some(format!("match.{key}: the certificate has no {key} SAN"));
            }
            if !values.iter().any(|v| set.is_match(form(v))) {
                return Some(says(key, format!("{values:?}")));
            }
        }
        None
    }
}

/// `sub` template: literal text with `{field}` placeholders.
#[derive(Debug)]
struct Template(Vec<Part>);

#[derive(Debug)]
enum Part {
    Text(String),
    Field(Field),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Spiffe,
    Uri,
    Dns,
    Email,
    Cn,
    Subject,
    Serial,
    Sha256,
}

impl Field {
    const ALL: &[(&'static str, Field)] = &[
        ("spiffe", Field::Spiffe),
        ("uri", Field::Uri),
        ("dns", Field::Dns),
        ("email", Field::Email),
        ("cn", Field::Cn),
        ("subject", Field::Subject),
        ("serial", Field::Serial),
        ("sha256", Field::Sha256),
    ];

    fn name(self) -> &'static str {
        Field::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("?", |(n, _)| n)
    }

    /// The field's value: for SANs, the one the rule matched, else the first.
    fn value<'a>(self, id: &'a Identity, matched: &'a Matched) -> Option<Cow<'a, str>> {
        let san = |matched: &'a Option<String>, all: &'a [String]| {
            matched.as_deref().or(all.first().map(String::as_str))
        };
        let borrowed = match self {
            Field::Spiffe => id.spiffe_id.as_deref(),
            Field::Uri => san(&matched.uri, &id.uri_sans),
            Field::Dns => san(&matched.dns, &id.dns_sans),
            Field::Email => san(&matched.email, &id.email_sans),
            Field::Cn => id.common_name.as_deref(),
            Field::Subject => Some(id.subject.as_str()),
            Field::Serial => Some(id.serial.as_str()),
            Field::Sha256 => return Some(Cow::Owned(id.sha256.hex())),
        };
        borrowed.map(Cow::Borrowed)
    }
}

impl Template {
    fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let end = rest[start..]
                .find('}')
                .ok_or_else(|| format!("unclosed '{{' in subject template {text:?}"))?;
            let name = &rest[start + 1..start + end];
            let field = Field::ALL
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, f)| *f)
                .ok_or_else(|| {
                    let known: Vec<&str> = Field::ALL.iter().map(|(n, _)| *n).collect();
                    format!(
                        "unknown placeholder {{{name}}} in subject template (known: {})",
                        known.join(", ")
                    )
                })?;
            parts.push(Part::Field(field));
            rest = &rest[start + end + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template(parts))
    }

    fn render(&self, id: &Identity, matched: &Matched) -> Result<String, Refusal> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => out.push_str(
                    &f.value(id, matched)
                        .ok_or(Refusal::SubjectUnavailable(f.name()))?,
                ),
            }
        }
        Ok(out)
    }
}

impl ClientRule {
    /// The token `sub` for this certificate under this rule: the template, or the SPIFFE
    /// ID, else the (matched) URI SAN, else the (matched) DNS SAN, else the subject DN.
    pub fn subject_for(&self, id: &Identity, matched: &Matched) -> Result<String, Refusal> {
        let subject = match &self.subject {
            Some(template) => template.render(id, matched)?,
            None => [Field::Spiffe, Field::Uri, Field::Dns, Field::Subject]
                .iter()
                .find_map(|f| f.value(id, matched))
                .unwrap_or_default()
                .into_owned(),
        };
        if subject.len() > MAX_SUBJECT_BYTES {
            return Err(Refusal::SubjectTooLong(subject.len()));
        }
        Ok(subject)
    }

    pub fn allows_flow(&self, flow: &str) -> bool {
        self.flows.iter().any(|f| f == flow)
    }

    /// `Err(seconds to wait)` when this certificate is over the rule's rate.
    pub fn check_rate(&self, cert: &CertDigest) -> Result<(), u64> {
        use governor::clock::{Clock, DefaultClock};
        let Some(limit) = &self.rate_limit else {
            return Ok(());
        };
        limit.buckets.check_key(cert).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

#[derive(Debug, Default)]
pub struct ClientRules(Vec<ClientRule>);

impl ClientRules {
    /// Compiles the rules; every problem is reported, each prefixed with its rule.
    pub fn build(
        configs: &[ClientRuleConfig],
        default_audience: &str,
        default_ttl: Duration,
        known_flows: &[&str],
    ) -> Result<ClientRules, Vec<String>> {
        let mut rules = Vec::new();
        let mut problems = Vec::new();
        let mut names = HashSet::new();
        for (index, config) in configs.iter().enumerate() {
            let label = format!("clients[{index}] ({:?})", config.name);
            if !names.insert(config.name.as_str()) {
                problems.push(format!("{label}: duplicate rule name"));
            }
            match ClientRule::build(config, default_audience, default_ttl, known_flows) {
                Ok(rule) => rules.push(rule),
                Err(errs) => problems.extend(errs.into_iter().map(|e| format!("{label}: {e}"))),
            }
        }
        if problems.is_empty() {
            Ok(ClientRules(rules))
        } else {
            Err(problems)
        }
    }

    /// Forgets rate-limit state of certificates not seen lately (bounds memory).
    pub fn retain_recent(&self) {
        for rule in &self.0 {
            if let Some(limit) = &rule.rate_limit {
                limit.buckets.retain_recent();
                limit.buckets.shrink_to_fit();
            }
        }
    }

    /// On reload: each rule takes over the rate-limit buckets of the running rule of the
    /// same name when the quota (rate and burst) is the same. A changed quota starts with
    /// empty buckets; the buckets of a rule that is gone go with the running build.
    pub fn keep_rate_limits_of(&mut self, running: &ClientRules) {
        for rule in &mut self.0 {
            let Some(limit) = &mut rule.rate_limit else {
                continue;
            };
            let kept = running
                .0
                .iter()
                .find(|old| old.name == rule.name)
                .and_then(|old| old.rate_limit.as_ref())
                .filter(|old| old.quota == limit.quota);
            if let Some(old) = kept {
                limit.buckets = old.buckets.clone();
            }
        }
    }

    /// The first rule matching this certificate, and what in it matched.
    /// For each rule `id` does not match, its name and the first condition that failed
    /// (`verify-cert` on a certificate no rule takes).
    pub fn misses(&self, id: &Identity) -> Vec<(String, String)> {
        self.0
            .iter()
            .filter_map(|rule| Some((rule.name.clone(), rule.matcher.first_mismatch(id)?)))
            .collect()
    }

    /// Names of the rules with `match.issuer` patterns none of `cas` (distinguished names
    /// as RFC 4514 text) matches, with those patterns.
    pub fn issuers_matching_none(&self, cas: &[&str]) -> Vec<(String, Vec<String>)> {
        self.0
            .iter()
            .filter_map(|rule| {
                let set = rule.matcher.issuer.as_ref()?;
                (!cas.iter().any(|ca| set.is_match(ca)))
                    .then(|| (rule.name.clone(), rule.matcher.written("issuer").to_vec()))
            })
            .collect()
    }

    pub fn find(&self, id: &Identity) -> Option<(&ClientRule, Matched)> {
        self.0
            .iter()
            .find_map(|rule| rule.matcher.matches(id).map(|m| (rule, m)))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl ClientRule {
    fn build(
        c: &ClientRuleConfig,
        default_audience: &str,
        default_ttl: Duration,
        known_flows: &[&str],
    ) -> Result<ClientRule, Vec<String>> {
        let mut problems = Vec::new();
        let matcher = build_matcher(&c.matcher, &mut problems);
        let subject = match c.subject.as_deref().map(Template::parse).transpose() {
            Ok(t) => t,
            Err(e) => {
                problems.push(e);
                None
            }
        };
        for flow in &c.flows {
            if !known_flows.contains(&flow.as_str()) {
                problems.push(format!(
                    "unknown flow {flow:?} (available: {})",
                    known_flows.join(", ")
                ));
            }
        }
        for account in &c.service_accounts {
            // They go into IAM Credentials URL paths.
            let plausible = account.contains('@')
                && account
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"@.-_".contains(&b));
            if !plausible {
                problems.push(format!(
                    "service_accounts: {account:?} is not a service-account email"
                ));
            }
        }
        let mut claims = Map::new();
        for (key, value) in &c.claims {
            if RESERVED_CLAIMS.contains(&key.as_str()) {
                problems.push(format!(
                    "static claim {key:?} is set by the broker and cannot be overridden"
                ));
                continue;
            }
            match json_claim(value) {
                Ok(v) => {
                    claims.insert(key.clone(), v);
                }
                Err(e) => problems.push(format!("static claim {key:?}: {e}")),
            }
        }
        let rate_limit = c.rate_limit.and_then(|limit| {
            let per_minute = std::num::NonZeroU32::new(limit.requests_per_minute);
            let burst = std::num::NonZeroU32::new(limit.burst.unwrap_or(limit.requests_per_minute));
            match (per_minute, burst) {
                (Some(rate), Some(burst)) => {
                    let quota = governor::Quota::per_minute(rate).allow_burst(burst);
                    Some(RateLimit {
                        quota,
                        buckets: Arc::new(governor::RateLimiter::keyed(quota)),
                    })
                }
                _ => {
                    problems.push(
                        "rate_limit: requests_per_minute and burst must be at least 1".into(),
                    );
                    None
                }
            }
        });
        let ttl = c.ttl.unwrap_or(default_ttl);
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            problems.push(format!(
                "ttl must be between 1s and 1h, got {}s",
                ttl.as_secs()
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let audiences = if c.audiences.is_empty() {
            vec![default_audience.to_owned()]
        } else {
            c.audiences.clone()
        };
        Ok(ClientRule {
            name: c.name.clone(),
            client_id: c.client_id.clone().unwrap_or_else(|| c.name.clone()),
            matcher,
            subject,
            audiences,
            flows: c.flows.clone(),
            service_accounts: c.service_accounts.clone(),
            scopes: c.scopes.clone(),
            target_audiences: c.target_audiences.clone(),
            claims,
            ttl,
            rate_limit,
        })
    }
}

/// The pattern that takes every trusted certificate, for a rule that means to.
pub const CATCH_ALL: &str = r#"match = { subject = ["**"] }"#;

fn build_matcher(m: &MatchConfig, problems: &mut Vec<String>) -> Matcher {
    // Destructured so that a new key cannot be forgotten here.
    let MatchConfig {
        spiffe,
        uri,
        dns,
        email,
        subject,
        issuer,
        sha256,
    } = m;
    let keys = [spiffe, uri, dns, email, subject, issuer, sha256];
    if keys.iter().all(|key| key.is_none()) {
        // A forgotten `match` must not quietly take every certificate the CAs ever issue.
        problems.push(format!(
            "no `match`: the rule would take every trusted certificate; add a `match` for the certificates it is for, or {CATCH_ALL} if it really is for all of them"
        ));
    }
    let mut set = |field: &str,
                   patterns: &Option<Vec<String>>,
                   ignore_case: bool,
                   key: fn(&str) -> String|
     -> Option<GlobSet> {
        let patterns = patterns.as_ref()?;
        if patterns.is_empty() {
            // An empty list would silently turn the rule into a catch-all.
            problems.push(format!(
                "match.{field} is empty; list patterns or remove it"
            ));
            return None;
        }
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            match GlobBuilder::new(&key(pattern))
                .literal_separator(true)
                .case_insensitive(ignore_case)
                // RFC 4514 text escapes with `\`: in DN patterns it is a literal character,
                // so the subject text openssl prints matches itself and only itself.
                .backslash_escape(!matches!(field, "subject" | "issuer"))
                .build()
            {
                Ok(glob) => {
                    builder.add(glob);
                }
                Err(e) => problems.push(format!("match.{field}: bad pattern {pattern:?}: {e}")),
            }
        }
        builder
            .build()
            .map_err(|e| problems.push(format!("match.{field}: {e}")))
            .ok()
    };
    let same = str::to_owned;
    let spiffe = set("spiffe", &m.spiffe, false, same);
    let uri = set("uri", &m.uri, false, same);
    let dns = set("dns", &m.dns, true, dns_key);
    // Case-sensitive globs over `email_key`, which lowercases the domain of both sides.
    let email = set("email", &m.email, false, email_key);
    let subject = set("subject", &m.subject, false, same);
    let issuer = set("issuer", &m.issuer, false, same);
    let mut sha256 = Vec::new();
    if m.sha256.as_ref().is_some_and(Vec::is_empty) {
        problems.push("match.sha256 is empty; list fingerprints or remove it".into());
    }
    for fingerprint in m.sha256.iter().flatten() {
        let hex: String = fingerprint.chars().filter(|c| *c != ':').collect();
        let digest = data_encoding::HEXLOWER_PERMISSIVE
            .decode(hex.as_bytes())
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok());
        if let Some(digest) = digest {
            sha256.push(CertDigest(digest));
        } else {
            problems.push(format!(
                "match.sha256: {fingerprint:?} is not a SHA-256 fingerprint (64 hex digits, colons optional)"
            ));
        }
    }
    let written = [
        ("spiffe", &m.spiffe),
        ("uri", &m.uri),
        ("dns", &m.dns),
        ("email", &m.email),
        ("subject", &m.subject),
        ("issuer", &m.issuer),
    ]
    .into_iter()
    .filter_map(|(key, patterns)| Some((key, patterns.clone()?)))
    .collect();
    Matcher {
        spiffe,
        uri,
        dns,
        email,
        subject,
        issuer,
        sha256,
        written,
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    pub(super) use super::*;

    pub(super) fn parse(toml_text: &str) -> Vec<ClientRuleConfig> {
        #[derive(serde::Deserialize)]
        struct W {
            clients: Vec<ClientRuleConfig>,
        }
        toml::from_str::<W>(toml_text).unwrap().clients
    }

    pub(super) fn rules(toml_text: &str) -> ClientRules {
        ClientRules::build(
            &parse(toml_text),
            "aud",
            Duration::from_secs(300),
            &["mtls-client-credentials"],
        )
        .unwrap()
    }

    pub(super) fn matches(rules: &ClientRules, change: impl FnOnce(&mut Identity)) -> bool {
        let mut id = identity();
        change(&mut id);
        rules.find(&id).is_some()
    }

    pub(crate) fn identity() -> Identity {
        Identity {
            subject: "CN=dev-1, O=Example".into(),
            common_name: Some("dev-1".into()),
            issuer: "CN=Example Root".into(),
            dns_sans: vec![
                "other.example.net".into(),
                "dev-1.devices.example.com".into(),
            ],
            uri_sans: vec!["spiffe://example.org/device/dev-1".into()],
            email_sans: vec![],
            ip_sans: vec![],
            spiffe_id: Some("spiffe://example.org/device/dev-1".into()),
            serial: "01".into(),
            sha256: crate::identity::CertDigest([0xab; 32]),
            not_before: 0,
            not_after: 0,
            key: crate::identity::KeyInfo::EcP256,
            has_eku: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::*;

    #[test]
    fn a_miss_names_the_first_failing_condition_exactly_when_the_rule_does_not_match() {
        let rules = rules(
            r#"
[[clients]]
name = "a"
match = { spiffe = ["spiffe://example.org/device/*"], issuer = ["CN=Example Root"], dns = ["*.devices.example.com"], email = ["*@example.com"] }
"#,
        );
        type Case = (fn(&mut Identity), Option<&'static str>);
        let cases: [Case; 6] = [
            (
                |_| {},
                Some("match.email: the certificate has no email SAN"),
            ),
            (|id| id.email_sans = vec!["x@example.com".into()], None),
            (
                |id| id.spiffe_id = None,
                Some("match.spiffe: the certificate has no SPIFFE ID"),
            ),
            (
                |id| id.issuer = "O=Example, CN=Example Root".into(),
                Some(
                    r#"match.issuer: "O=Example, CN=Example Root" matches none of ["CN=Example Root"]"#,
                ),
            ),
            (
                |id| {
                    id.email_sans = vec!["x@example.com".into()];
                    id.dns_sans = vec!["dev-1.example.com".into()];
                },
                Some(
                    r#"match.dns: ["dev-1.example.com"] matches none of ["*.devices.example.com"]"#,
                ),
            ),
            (
                |id| id.spiffe_id = Some("spiffe://example.org/other/x".into()),
                Some(
                    r#"match.spiffe: "spiffe://example.org/other/x" matches none of ["spiffe://example.org/device/*"]"#,
                ),
            ),
        ];
        for (change, says) in cases {
            let mut id = identity();
            change(&mut id);
            let misses = rules.misses(&id);
            assert_eq!(misses.first().map(|(_, why)| why.as_str()), says);
            assert_eq!(rules.find(&id).is_none(), says.is_some(), "{says:?}");
        }
    }

    fn rule(toml_text: &str) -> Result<ClientRules, Vec<String>> {
        ClientRules::build(
            &parse(toml_text),
            "aud",
            Duration::from_secs(300),
            &["mtls-client-credentials"],
        )
    }

    #[test]
    fn first_match_wins_and_fields_are_anded() {
        let rules = rule(
            r#"
            [[clients]]
            name = "wrong-issuer"
            match = { spiffe = ["spiffe://example.org/device/*"], issuer = ["CN=Other*"] }
            [[clients]]
            name = "devices"
            match = { spiffe = ["spiffe://example.org/device/*"], dns = ["*.Devices.example.com"] }
            [[clients]]
            name = "catch-all"
            match = { subject = ["**"] }
            "#,
        )
        .unwrap();
        let (rule, matched) = rules.find(&identity()).unwrap();
        assert_eq!(rule.name, "devices");
        assert_eq!(matched.dns.as_deref(), Some("dev-1.devices.example.com"));
    }

    #[test]
    fn star_does_not_cross_path_segments() {
        let rules =
            rule("[[clients]]\nname='x'\nmatch={spiffe=['spiffe://example.org/*']}").unwrap();
        assert!(rules.find(&identity()).is_none());
        let rules =
            rule("[[clients]]\nname='x'\nmatch={spiffe=['spiffe://example.org/**']}").unwrap();
        assert!(rules.find(&identity()).is_some());
    }

    #[test]
    fn subject_templates_render_and_refuse_missing_fields() {
        let rules =
            rule("[[clients]]\nname='x'\nmatch={subject=['**']}\nsubject='device:{cn}'").unwrap();
        let (r, m) = rules.find(&identity()).unwrap();
        assert_eq!(r.subject_for(&identity(), &m).unwrap(), "device:dev-1");
        let rules =
            rule("[[clients]]\nname='x'\nmatch={subject=['**']}\nsubject='{email}'").unwrap();
        let (r, m) = rules.find(&identity()).unwrap();
        assert_eq!(
            r.subject_for(&identity(), &m),
            Err(Refusal::SubjectUnavailable("email"))
        );
        let rules = rule(&format!(
            "[[clients]]\nname='x'\nmatch={{subject=['**']}}\nsubject='{}{{cn}}'",
            "a".repeat(125)
        ))
        .unwrap();
        let (r, m) = rules.find(&identity()).unwrap();
        assert_eq!(
            r.subject_for(&identity(), &m),
            Err(Refusal::SubjectTooLong(130))
        );
    }

    #[test]
    fn static_claims_keep_their_json_types_and_dates_become_rfc3339_text() {
        let rules = rule(
            "[[clients]]\nname='x'\nmatch={subject=['**']}\nclaims={site='a', n=3, ok=true, ratio=0.5, tags=['x'], \
             nested={k='v'}, since=1979-05-27T07:32:00Z, day=1979-05-27}",
        )
        .unwrap();
        let (r, _) = rules.find(&identity()).unwrap();
        assert_eq!(
            serde_json::Value::Object(r.claims.clone()),
            serde_json::json!({"site": "a", "n": 3, "ok": true, "ratio": 0.5, "tags": ["x"],
                "nested": {"k": "v"}, "since": "1979-05-27T07:32:00Z", "day": "1979-05-27"})
        );
        let problems = rule("[[clients]]\nname='x'\nmatch={subject=['**']}\nclaims={bad=nan}")
            .err()
            .unwrap();
        assert!(problems[0].contains("no JSON form"), "{problems:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let problems = rule(
            r#"
            [[clients]]
            name = "a"
            match = { dns = ["[unclosed"], sha256 = ["nothex"] }
            subject = "{nope}"
            flows = ["teleport"]
            claims = { sub = "x" }
            ttl = "2h"
            [[clients]]
            name = "a"
            "#,
        )
        .unwrap_err();
        let all = problems.join("\n");
        for needle in [
            "[unclosed",
            "nothex",
            "{nope}",
            "teleport",
            "\"sub\"",
            "ttl",
            "duplicate",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
    }
}

#[cfg(test)]
mod matching {
    use super::tests_support::*;

    #[test]
    fn dns_star_is_exactly_one_label_and_email_domains_are_exact() {
        let by_dns = rules("[[clients]]\nname='x'\nmatch={dns=['*.devices.example.com']}");
        assert!(matches(&by_dns, |id| id.dns_sans =
            vec!["a.devices.example.com".into()]));
        assert!(!matches(&by_dns, |id| id.dns_sans =
            vec!["a.b.devices.example.com".into()]));
        assert!(!matches(&by_dns, |id| id.dns_sans =
            vec!["devices.example.com".into()]));
        let by_email = rules("[[clients]]\nname='x'\nmatch={email=['*@example.com']}");
        assert!(matches(&by_email, |id| id.email_sans =
            vec!["ops@example.com".into()]));
        assert!(!matches(&by_email, |id| id.email_sans =
            vec!["ops@mail.example.com".into()]));
    }

    /// The local part of an email is matched exactly (RFC 5321 2.4: it is case-sensitive),
    /// the domain without case, in values and in patterns.
    #[test]
    fn email_local_parts_keep_their_case_and_domains_ignore_it() {
        let by_email = rules("[[clients]]\nname='x'\nmatch={email=['Ops@Example.COM']}");
        assert!(matches(&by_email, |id| id.email_sans =
            vec!["Ops@example.com".into()]));
        assert!(matches(&by_email, |id| id.email_sans =
            vec!["Ops@EXAMPLE.com".into()]));
        assert!(!matches(&by_email, |id| id.email_sans =
            vec!["ops@example.com".into()]));
        assert!(!matches(&by_email, |id| id.email_sans =
            vec!["OPS@example.com".into()]));
        let by_domain = rules("[[clients]]\nname='x'\nmatch={email=['dev-*@*.Example.com']}");
        assert!(matches(&by_domain, |id| id.email_sans =
            vec!["dev-1@a.example.COM".into()]));
        assert!(!matches(&by_domain, |id| id.email_sans =
            vec!["DEV-1@a.example.com".into()]));
    }

    /// Found by tests/it/properties.rs: with glob escapes, `CN=a\,O=Example` (one CN with a
    /// comma) did not match its own certificate but did match the DN `CN=a,O=Example`.
    #[test]
    fn dn_patterns_take_backslashes_literally() {
        let by_subject = rules("[[clients]]\nname='x'\nmatch={subject=['CN=a\\,O=Example']}");
        assert!(matches(&by_subject, |id| id.subject = r"CN=a\,O=Example".into()));
        assert!(!matches(&by_subject, |id| id.subject = "CN=a,O=Example".into()));
        let star = rules("[[clients]]\nname='x'\nmatch={issuer=['CN=[*].example.com']}");
        assert!(matches(&star, |id| id.issuer = "CN=*.example.com".into()));
        assert!(!matches(&star, |id| id.issuer = "CN=a.example.com".into()));
    }

    #[test]
    fn empty_pattern_lists_are_errors_not_catch_alls() {
        let problems = super::ClientRules::build(
            &parse("[[clients]]\nname='x'\nmatch={dns=[]}"),
            "aud",
            std::time::Duration::from_secs(60),
            &["mtls-client-credentials"],
        )
        .unwrap_err();
        assert!(problems[0].contains("match.dns is empty"), "{problems:?}");
    }

    #[test]
    fn a_rule_without_match_is_an_error_and_double_star_subject_the_explicit_catch_all() {
        for text in ["[[clients]]\nname='x'", "[[clients]]\nname='x'\nmatch={}"] {
            let problems = super::ClientRules::build(
                &parse(text),
                "aud",
                std::time::Duration::from_secs(60),
                &["mtls-client-credentials"],
            )
            .unwrap_err();
            assert!(
                problems[0].starts_with("clients[0] (\"x\"): no `match`")
                    && problems[0].contains(r#"match = { subject = ["**"] }"#),
                "{problems:?}"
            );
        }
        let all = rules("[[clients]]\nname='x'\nmatch={subject=['**']}");
        assert!(matches(&all, |_| {}));
        assert!(matches(&all, |id| id.subject = "CN=a/b, O=c/d".into()));
        assert!(matches(&all, |id| id.subject = String::new()));
    }

    #[test]
    fn subject_comes_from_the_matched_san() {
        let gateways = rules("[[clients]]\nname='x'\nmatch={dns=['*.gw.example.com']}");
        let mut id = identity();
        id.spiffe_id = None;
        id.uri_sans.clear();
        id.dns_sans = vec!["unrelated.example.net".into(), "g1.gw.example.com".into()];
        let (rule, matched) = gateways.find(&id).unwrap();
        assert_eq!(
            rule.subject_for(&id, &matched).unwrap(),
            "g1.gw.example.com"
        );
    }
}
