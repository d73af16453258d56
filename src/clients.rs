//! Client rules (`[[clients]]`): which certificates are which clients, and what they may get.
//!
//! Rules are tried in order and the first match wins, so specific rules go first. Patterns
//! are globs (globset) where `*` stays within one `/`-separated segment and `**` crosses
//! segments; DNS and email patterns ignore case, as those names do.

use std::collections::HashSet;
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde_json::{Map, Value};

use crate::config::{ClientRuleConfig, MatchConfig, MAX_TOKEN_TTL};
use crate::identity::Identity;
use crate::trust::Refusal;

/// Google's limit for `google.subject`, which is mapped from `sub`.
pub const MAX_SUBJECT_BYTES: usize = 127;

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
    pub claims: Map<String, Value>,
    pub ttl: Duration,
}

#[derive(Debug, Default)]
struct Matcher {
    spiffe: Option<GlobSet>,
    uri: Option<GlobSet>,
    dns: Option<GlobSet>,
    email: Option<GlobSet>,
    subject: Option<GlobSet>,
    issuer: Option<GlobSet>,
    sha256: Vec<String>,
}

impl Matcher {
    fn matches(&self, id: &Identity) -> bool {
        fn one(set: &Option<GlobSet>, value: Option<&str>) -> bool {
            set.as_ref()
                .is_none_or(|s| value.is_some_and(|v| s.is_match(v)))
        }
        fn any(set: &Option<GlobSet>, values: &[String]) -> bool {
            set.as_ref()
                .is_none_or(|s| values.iter().any(|v| s.is_match(v)))
        }
        one(&self.spiffe, id.spiffe_id.as_deref())
            && any(&self.uri, &id.uri_sans)
            && any(&self.dns, &id.dns_sans)
            && any(&self.email, &id.email_sans)
            && one(&self.subject, Some(&id.subject))
            && one(&self.issuer, Some(&id.issuer))
            && (self.sha256.is_empty() || self.sha256.contains(&id.sha256_hex))
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

    fn value(self, id: &Identity) -> Option<&str> {
        match self {
            Field::Spiffe => id.spiffe_id.as_deref(),
            Field::Uri => id.uri_sans.first().map(String::as_str),
            Field::Dns => id.dns_sans.first().map(String::as_str),
            Field::Email => id.email_sans.first().map(String::as_str),
            Field::Cn => id.common_name.as_deref(),
            Field::Subject => Some(&id.subject),
            Field::Serial => Some(&id.serial),
            Field::Sha256 => Some(&id.sha256_hex),
        }
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

    fn render(&self, id: &Identity) -> Result<String, Refusal> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => {
                    out.push_str(f.value(id).ok_or(Refusal::SubjectUnavailable(f.name()))?)
                }
            }
        }
        Ok(out)
    }
}

impl ClientRule {
    /// The token `sub` for this certificate under this rule.
    pub fn subject_for(&self, id: &Identity) -> Result<String, Refusal> {
        let subject = match &self.subject {
            Some(template) => template.render(id)?,
            None => id.default_subject().to_owned(),
        };
        if subject.len() > MAX_SUBJECT_BYTES {
            return Err(Refusal::SubjectTooLong(subject.len()));
        }
        Ok(subject)
    }

    pub fn allows_flow(&self, flow: &str) -> bool {
        self.flows.iter().any(|f| f == flow)
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

    /// The first rule matching this certificate.
    pub fn find(&self, id: &Identity) -> Option<&ClientRule> {
        self.0.iter().find(|rule| rule.matcher.matches(id))
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
        let mut claims = Map::new();
        for (key, value) in &c.claims {
            if RESERVED_CLAIMS.contains(&key.as_str()) {
                problems.push(format!(
                    "static claim {key:?} is set by the broker and cannot be overridden"
                ));
                continue;
            }
            match serde_json::to_value(value) {
                Ok(v) => {
                    claims.insert(key.clone(), v);
                }
                Err(e) => problems.push(format!("static claim {key:?}: {e}")),
            }
        }
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
            claims,
            ttl,
        })
    }
}

fn build_matcher(m: &MatchConfig, problems: &mut Vec<String>) -> Matcher {
    let mut set = |field: &str, patterns: &[String], ignore_case: bool| -> Option<GlobSet> {
        if patterns.is_empty() {
            return None;
        }
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            match GlobBuilder::new(pattern)
                .literal_separator(true)
                .case_insensitive(ignore_case)
                .build()
            {
                Ok(glob) => {
                    builder.add(glob);
                }
                Err(e) => problems.push(format!("match.{field}: bad pattern {pattern:?}: {e}")),
            }
        }
        match builder.build() {
            Ok(s) => Some(s),
            Err(e) => {
                problems.push(format!("match.{field}: {e}"));
                None
            }
        }
    };
    let matcher = Matcher {
        spiffe: set("spiffe", &m.spiffe, false),
        uri: set("uri", &m.uri, false),
        dns: set("dns", &m.dns, true),
        email: set("email", &m.email, true),
        subject: set("subject", &m.subject, false),
        issuer: set("issuer", &m.issuer, false),
        sha256: Vec::new(),
    };
    let mut sha256 = Vec::new();
    for fingerprint in &m.sha256 {
        let hex: String = fingerprint
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            sha256.push(hex);
        } else {
            problems.push(format!(
                "match.sha256: {fingerprint:?} is not a SHA-256 fingerprint (64 hex digits, colons optional)"
            ));
        }
    }
    Matcher { sha256, ..matcher }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            subject: "CN=dev-1, O=Example".into(),
            common_name: Some("dev-1".into()),
            issuer: "CN=Example Root".into(),
            dns_sans: vec!["Dev-1.Devices.Example.com".into()],
            uri_sans: vec!["spiffe://example.org/device/dev-1".into()],
            email_sans: vec![],
            ip_sans: vec![],
            spiffe_id: Some("spiffe://example.org/device/dev-1".into()),
            serial: "01".into(),
            sha256_hex: "ab".repeat(32),
            x5t_s256: String::new(),
            not_before: 0,
            not_after: 0,
            key: crate::identity::KeyInfo::EcP256,
            has_eku: true,
        }
    }

    fn rule(toml_text: &str) -> Result<ClientRules, Vec<String>> {
        #[derive(serde::Deserialize)]
        struct W {
            clients: Vec<ClientRuleConfig>,
        }
        let w: W = toml::from_str(toml_text).unwrap();
        ClientRules::build(
            &w.clients,
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
            match = { spiffe = ["spiffe://example.org/device/*"], dns = ["*.devices.example.com"] }
            [[clients]]
            name = "catch-all"
            "#,
        )
        .unwrap();
        assert_eq!(rules.find(&identity()).unwrap().name, "devices");
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
        let rules = rule("[[clients]]\nname='x'\nsubject='device:{cn}'").unwrap();
        let r = rules.find(&identity()).unwrap();
        assert_eq!(r.subject_for(&identity()).unwrap(), "device:dev-1");
        let rules = rule("[[clients]]\nname='x'\nsubject='{email}'").unwrap();
        let r = rules.find(&identity()).unwrap();
        assert_eq!(
            r.subject_for(&identity()),
            Err(Refusal::SubjectUnavailable("email"))
        );
        let rules = rule(&format!(
            "[[clients]]\nname='x'\nsubject='{}{{cn}}'",
            "a".repeat(125)
        ))
        .unwrap();
        let r = rules.find(&identity()).unwrap();
        assert_eq!(
            r.subject_for(&identity()),
            Err(Refusal::SubjectTooLong(130))
        );
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
