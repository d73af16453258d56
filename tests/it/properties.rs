//! Property tests (proptest) for client rules and their glob patterns, stated from the
//! documented semantics (README "Configuration", config.toml's `[[clients]]` comment):
//! rules are tried in order and the first match wins; within `match` every key given must
//! match (AND) and any one pattern of a key suffices (OR); an empty list is an error, not a
//! catch-all; `*` stays within a `/`-separated segment and `**` crosses segments; in DNS
//! names and email domains `*` is exactly one label, and DNS patterns and email domains
//! ignore case while an email's local part is matched exactly;
//! `subject`/`issuer` patterns match RFC 4514 text as `openssl -nameopt RFC2253` prints it;
//! `sha256` lists exact fingerprints (hex, colons optional).

use std::sync::OnceLock;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use token_broker::clients::ClientRules;
use token_broker::config::ClientRuleConfig;
use token_broker::flows;
use token_broker::identity::Identity;

const FIELDS: &[&str] = &["spiffe", "uri", "dns", "email", "subject", "issuer"];

/// A rule named `name` whose `match` has these keys, as the config file would give it.
fn rule(name: &str, keys: &[(&str, Vec<String>)]) -> ClientRuleConfig {
    let mut matcher = toml::Table::new();
    for (key, patterns) in keys {
        let list = patterns.iter().cloned().map(toml::Value::String).collect();
        matcher.insert((*key).to_owned(), toml::Value::Array(list));
    }
    let mut table = toml::Table::new();
    table.insert("name".into(), toml::Value::String(name.to_owned()));
    table.insert("match".into(), toml::Value::Table(matcher));
    toml::Value::Table(table).try_into().unwrap()
}

fn build(rules: &[ClientRuleConfig]) -> Result<ClientRules, Vec<String>> {
    ClientRules::build(rules, "aud", Duration::from_secs(300), &flows::names())
}

/// Whether a single rule with these keys matches `id`.
fn matches(keys: &[(&str, Vec<String>)], id: &Identity) -> bool {
    build(&[rule("r", keys)]).unwrap().find(id).is_some()
}

fn one(field: &str, pattern: &str, id: &Identity) -> bool {
    matches(&[(field, vec![pattern.to_owned()])], id)
}

/// A real identity (from an rcgen certificate) to change fields of.
fn base() -> Identity {
    static BASE: OnceLock<Identity> = OnceLock::new();
    BASE.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["base.example.com".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "base");
        let cert = params.self_signed(&key).unwrap();
        Identity::from_der(cert.der()).unwrap()
    })
    .clone()
}

/// An identity whose `field` has exactly `value` (SAN fields: the only SAN of that kind).
fn with(field: &str, value: &str) -> Identity {
    let mut id = base();
    set(&mut id, field, Some(value));
    id
}

fn set(id: &mut Identity, field: &str, value: Option<&str>) {
    let list = value.map(|v| vec![v.to_owned()]).unwrap_or_default();
    match field {
        "spiffe" => {
            id.spiffe_id = value.map(str::to_owned);
            id.uri_sans = list;
        }
        "uri" => id.uri_sans = list,
        "dns" => id.dns_sans = list,
        "email" => id.email_sans = list,
        "subject" => id.subject = value.unwrap_or_default().to_owned(),
        "issuer" => id.issuer = value.unwrap_or_default().to_owned(),
        other => panic!("no field {other}"),
    }
}

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?"
}

fn dns_name() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..5).prop_map(|labels| labels.join("."))
}

fn trust_domain() -> impl Strategy<Value = String> {
    prop::collection::vec(label(), 1..3).prop_map(|labels| labels.join("."))
}

fn segment() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,6}"
}

fn segments(range: std::ops::Range<usize>) -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(segment(), range)
}

fn spiffe_id() -> impl Strategy<Value = String> {
    (trust_domain(), segments(0..4)).prop_map(|(td, path)| spiffe(&td, &path))
}

fn spiffe(td: &str, path: &[String]) -> String {
    if path.is_empty() {
        format!("spiffe://{td}")
    } else {
        format!("spiffe://{td}/{}", path.join("/"))
    }
}

fn email() -> impl Strategy<Value = String> {
    ("[a-zA-Z0-9._+-]{1,8}", dns_name()).prop_map(|(local, domain)| format!("{local}@{domain}"))
}

/// Values without glob metacharacters (`* ? [ ] { } \`) for each field, as the broker's
/// identities carry them (DNS lowercase, email domains lowercase).
fn literal_value(field: &'static str) -> BoxedStrategy<String> {
    match field {
        "spiffe" => spiffe_id().boxed(),
        "uri" => "(https|urn|spiffe)://[a-zA-Z0-9./:_-]{1,20}".boxed(),
        "dns" => dns_name().boxed(),
        "email" => email().boxed(),
        _ => "(CN|O|OU)=[a-zA-Z0-9 ._/-]{1,10}(,(CN|O|OU)=[a-zA-Z0-9 ._/-]{1,10}){0,2}".boxed(),
    }
}

/// Two addresses are one mailbox when their local parts are equal and their domains equal
/// but for case (the documented rule, stated here apart from the broker's code).
fn same_email(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((a_local, a_domain)), Some((b_local, b_domain))) => {
            a_local == b_local && a_domain.eq_ignore_ascii_case(b_domain)
        }
        _ => a == b,
    }
}

fn flip_case(text: &str, flips: &[bool]) -> String {
    text.chars()
        .zip(flips.iter().cycle())
        .map(|(c, flip)| if *flip { c.to_ascii_uppercase() } else { c })
        .collect()
}

proptest! {
    // Failures are kept in properties.proptest-regressions beside this file: with a main.rs
    // in tests/it/, proptest's default would use tests/proptest-regressions/properties.txt.
    #![proptest_config(ProptestConfig {
        cases: 128,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    /// A pattern without metacharacters matches exactly the value it spells.
    #[test]
    fn literal_patterns_match_exactly_themselves(
        (field, value, other) in (0..FIELDS.len()).prop_flat_map(|i| {
            let field = FIELDS[i];
            (Just(field), literal_value(field), literal_value(field))
        }),
    ) {
        prop_assert!(one(field, &value, &with(field, &value)));
        let same = if field == "dns" {
            value.eq_ignore_ascii_case(&other)
        } else if field == "email" {
            same_email(&value, &other)
        } else {
            value == other
        };
        prop_assert_eq!(one(field, &value, &with(field, &other)), same);
    }

    /// DNS: `*` is exactly one label, never zero, never two, never across a dot.
    #[test]
    fn dns_star_is_exactly_one_label(
        suffix in dns_name(),
        other_suffix in dns_name(),
        first in label(),
        second in label(),
    ) {
        let pattern = format!("*.{suffix}");
        let value = format!("{first}.{suffix}");
        prop_assert!(one("dns", &pattern, &with("dns", &value)), "{} should match {}", pattern, value);
        let value = format!("{first}.{second}.{suffix}");
        prop_assert!(!one("dns", &pattern, &with("dns", &value)), "{} should not match {}", pattern, value);
        prop_assert!(!one("dns", &pattern, &with("dns", &suffix)));
        if other_suffix != suffix {
            let value = format!("{first}.{other_suffix}");
            prop_assert!(!one("dns", &pattern, &with("dns", &value)), "{} should not match {}", pattern, value);
        }
        // Within a label too: `dev-*` stays in its label.
        let partial = format!("{first}-*.{suffix}");
        let value = format!("{first}-{second}.{suffix}");
        prop_assert!(one("dns", &partial, &with("dns", &value)), "{} should match {}", partial, value);
        let value = format!("{first}-{second}.{first}.{suffix}");
        prop_assert!(!one("dns", &partial, &with("dns", &value)), "{} should not match {}", partial, value);
    }

    /// DNS: `**` crosses labels, but only whole labels in front of the suffix. (Whether
    /// it also matches the bare suffix is not documented, so not tested.)
    #[test]
    fn dns_double_star_crosses_labels_not_suffixes(
        suffix in dns_name(),
        front in prop::collection::vec(label(), 1..4),
        glued in label(),
        name in dns_name(),
    ) {
        let pattern = format!("**.{suffix}");
        let value = format!("{}.{suffix}", front.join("."));
        prop_assert!(one("dns", &pattern, &with("dns", &value)), "{} should match {}", pattern, value);
        // Not a name that merely ends in the suffix's text (`evilexample.com`).
        let value = format!("{glued}{suffix}");
        prop_assert!(!one("dns", &pattern, &with("dns", &value)), "{} should not match {}", pattern, value);
        if name != suffix {
            let below = name.ends_with(&format!(".{suffix}"));
            prop_assert_eq!(one("dns", &pattern, &with("dns", &name)), below);
        }
    }

    /// DNS patterns and email domains ignore case; an email's local part, SPIFFE, URI,
    /// subject and issuer patterns do not.
    #[test]
    fn case_rules(
        name in dns_name(),
        address in email(),
        id in spiffe_id(),
        flips in prop::collection::vec(any::<bool>(), 1..16),
    ) {
        prop_assert!(one("dns", &flip_case(&name, &flips), &with("dns", &name)));
        prop_assert!(one("dns", &name, &with("dns", &flip_case(&name, &flips))));
        let shouted = flip_case(&address, &flips);
        let same = same_email(&shouted, &address);
        prop_assert_eq!(one("email", &shouted, &with("email", &address)), same);
        prop_assert_eq!(one("email", &address, &with("email", &shouted)), same);
        // The domain alone, in any case, always matches.
        let (local, domain) = address.rsplit_once('@').unwrap();
        let shouted = format!("{local}@{}", flip_case(domain, &flips));
        prop_assert!(one("email", &shouted, &with("email", &address)));
        prop_assert!(one("email", &address, &with("email", &shouted)));
        let shouted = flip_case(&id, &flips);
        prop_assert_eq!(one("spiffe", &shouted, &with("spiffe", &id)), shouted == id);
        prop_assert_eq!(one("uri", &shouted, &with("uri", &id)), shouted == id);
        let subject = format!("CN={name}");
        let shouted = flip_case(&subject, &flips);
        prop_assert_eq!(one("subject", &shouted, &with("subject", &subject)), shouted == subject);
        prop_assert_eq!(one("issuer", &shouted, &with("issuer", &subject)), shouted == subject);
    }

    /// Email: `*` covers the local part; the domain is exact (one label per `*` there too).
    #[test]
    fn email_domains_are_exact(
        local in "[a-zA-Z0-9._+-]{1,8}",
        domain in dns_name(),
        sub in label(),
    ) {
        let pattern = format!("*@{domain}");
        let value = format!("{local}@{domain}");
        prop_assert!(one("email", &pattern, &with("email", &value)), "{} should match {}", pattern, value);
        let value = format!("{local}@{sub}.{domain}");
        prop_assert!(!one("email", &pattern, &with("email", &value)), "{} should not match {}", pattern, value);
        let any_sub = format!("*@*.{domain}");
        let value = format!("{local}@{sub}.{domain}");
        prop_assert!(one("email", &any_sub, &with("email", &value)), "{} should match {}", any_sub, value);
        let value = format!("{local}@{domain}");
        prop_assert!(!one("email", &any_sub, &with("email", &value)), "{} should not match {}", any_sub, value);
    }

    /// SPIFFE: `spiffe://td/path/*` is one more segment under that path in that trust
    /// domain; `**` any depth; neither ever reaches another trust domain.
    #[test]
    fn spiffe_wildcards_stay_in_their_trust_domain(
        td in trust_domain(),
        other_td in trust_domain(),
        glue in "[a-z0-9.-]{1,6}",
        path in segments(1..3),
        tail in segments(1..4),
    ) {
        let prefix = spiffe(&td, &path);
        let star = format!("{prefix}/*");
        let double = format!("{prefix}/**");
        let below = |tail: &[String]| format!("{prefix}/{}", tail.join("/"));
        prop_assert_eq!(one("spiffe", &star, &with("spiffe", &below(&tail))), tail.len() == 1);
        prop_assert!(one("spiffe", &double, &with("spiffe", &below(&tail))));
        for foreign_td in [other_td.clone(), format!("{td}{glue}"), format!("{glue}{td}")] {
            if foreign_td == td {
                continue;
            }
            let foreign = format!("{}/{}", spiffe(&foreign_td, &path), tail.join("/"));
            prop_assert!(!one("spiffe", &star, &with("spiffe", &foreign)), "{} matched {}", star, foreign);
            prop_assert!(!one("spiffe", &double, &with("spiffe", &foreign)), "{} matched {}", double, foreign);
            let any_path = format!("spiffe://{td}/**");
            prop_assert!(!one("spiffe", &any_path, &with("spiffe", &foreign)));
        }
    }

    /// A key that is given needs a value: a certificate without that field never matches,
    /// whatever the pattern.
    #[test]
    fn constrained_keys_need_a_value(
        field in prop::sample::select(&["spiffe", "uri", "dns", "email"][..]),
        pattern in prop::sample::select(&["*", "**", "**/*", "*.*", "?*"][..]),
    ) {
        let mut id = base();
        set(&mut id, field, None);
        prop_assert!(!one(field, pattern, &id));
    }

    /// AND across keys, OR within a key.
    #[test]
    fn keys_are_anded_and_patterns_ored(
        id in sample_spiffe_id(),
        name in sample_dns_name(),
        spiffe_patterns in prop::collection::vec(spiffe_pattern(), 1..3),
        dns_patterns in prop::collection::vec(dns_pattern(), 1..3),
    ) {
        let mut identity = with("spiffe", &id);
        set(&mut identity, "dns", Some(&name));
        let each = |field: &str, patterns: &[String]| -> Vec<bool> {
            patterns.iter().map(|p| one(field, p, &identity)).collect()
        };
        let spiffe_any = matches(&[("spiffe", spiffe_patterns.clone())], &identity);
        let dns_any = matches(&[("dns", dns_patterns.clone())], &identity);
        prop_assert_eq!(spiffe_any, each("spiffe", &spiffe_patterns).contains(&true));
        prop_assert_eq!(dns_any, each("dns", &dns_patterns).contains(&true));
        let both = matches(&[("spiffe", spiffe_patterns), ("dns", dns_patterns)], &identity);
        prop_assert_eq!(both, spiffe_any && dns_any);
    }

    /// Rules are tried in order: the first rule that matches on its own is the one found.
    #[test]
    fn first_match_wins(
        id in sample_spiffe_id(),
        name in sample_dns_name(),
        keys in prop::collection::vec(
            (prop::option::of(spiffe_pattern()), prop::option::of(dns_pattern())),
            1..6,
        ),
    ) {
        let mut identity = with("spiffe", &id);
        set(&mut identity, "dns", Some(&name));
        let configs: Vec<ClientRuleConfig> = keys
            .iter()
            .enumerate()
            .map(|(i, (spiffe, dns))| {
                let mut k = Vec::new();
                if let Some(p) = spiffe {
                    k.push(("spiffe", vec![p.clone()]));
                }
                if let Some(p) = dns {
                    k.push(("dns", vec![p.clone()]));
                }
                if k.is_empty() {
                    // A rule needs a `match`; this is the explicit catch-all.
                    k.push(("subject", vec!["**".to_owned()]));
                }
                rule(&format!("rule-{i}"), &k)
            })
            .collect();
        let alone = configs
            .iter()
            .position(|c| build(std::slice::from_ref(c)).unwrap().find(&identity).is_some());
        let rules = build(&configs).unwrap();
        let found = rules.find(&identity).map(|(r, _)| r.name.clone());
        let expected = alone.map(|i| format!("rule-{i}"));
        prop_assert_eq!(found, expected);
    }

    /// Arbitrary pattern strings compile or are reported; they never panic, at load or when
    /// matching.
    #[test]
    fn arbitrary_patterns_load_or_fail_cleanly(
        field in prop::sample::select(&["spiffe", "uri", "dns", "email", "subject", "issuer", "sha256"][..]),
        patterns in prop::collection::vec(
            prop_oneof!["[*?\\[\\]{}!,/\\\\a.^@-]{0,12}", any::<String>()],
            1..4,
        ),
    ) {
        match build(&[rule("r", &[(field, patterns)])]) {
            Ok(rules) => {
                let _ = rules.find(&base());
                let _ = rules.find(&with("spiffe", "spiffe://example.org/x"));
            }
            Err(problems) => {
                prop_assert!(!problems.is_empty());
                let key = format!("match.{field}");
                prop_assert!(problems.iter().all(|p| p.contains(&key)), "{:?}", problems);
            }
        }
    }

    /// `sha256` fingerprints match exactly, in any case, with or without colons.
    #[test]
    fn fingerprints_are_exact(
        position in 0..64usize,
        colons in any::<bool>(),
        upper in any::<bool>(),
    ) {
        let id = base();
        let mut text = id.sha256.hex();
        if upper {
            text = text.to_ascii_uppercase();
        }
        let written = |hex: &str| if colons {
            hex.as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(":")
        } else {
            hex.to_owned()
        };
        prop_assert!(one("sha256", &written(&text), &id));
        let mut other: Vec<char> = text.chars().collect();
        other[position] = if other[position] == '0' { '1' } else { '0' };
        let other: String = other.into_iter().collect();
        prop_assert!(!one("sha256", &written(&other), &id));
    }

    /// The subject text the broker shows for a certificate (RFC 4514 as `openssl
    /// -nameopt RFC2253` prints it, which the docs say patterns match) used as a literal
    /// pattern matches that certificate, and not another DN that reads the same once the
    /// escapes are dropped (a CN `a,O=Example` is not the two RDNs `CN=a,O=Example`).
    #[test]
    fn subject_text_patterns_match_only_their_dn(
        head in "[a-z]{1,4}",
        special in prop::sample::select(vec![',', '+', ';', '<', '>', '"', '\\']),
        org in "[A-Z][a-z]{0,5}",
    ) {
        let id = certificate_with_cn(&format!("{head}{special}O={org}"));
        prop_assert!(id.subject.contains('\\'), "{:?} is escaped", id.subject);
        prop_assert!(one("subject", &id.subject, &id), "{:?} does not match itself", id.subject);
        let lookalike = with("subject", &id.subject.replace('\\', ""));
        prop_assert!(!one("subject", &id.subject, &lookalike), "{:?} matched {:?}", id.subject, lookalike.subject);
        prop_assert!(one("issuer", &id.issuer, &id));
    }
}

fn spiffe_pattern() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "spiffe://a.example/**",
        "spiffe://a.example/*",
        "spiffe://a.example/device/*",
        "spiffe://b.example/**",
        "spiffe://*/device/*",
        "spiffe://a.example",
    ])
    .prop_map(str::to_owned)
}

/// Identities the sample patterns below sometimes match and sometimes not.
fn sample_spiffe_id() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "spiffe://a.example/device/d1",
            "spiffe://a.example/x",
            "spiffe://a.example",
            "spiffe://b.example/device/d2/extra",
            "spiffe://a.example.evil/device/d1",
        ])
        .prop_map(str::to_owned),
        spiffe_id(),
    ]
}

fn sample_dns_name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "d1.a.example",
            "x.y.a.example",
            "q.r.b.example",
            "a.example",
            "other.net",
        ])
        .prop_map(str::to_owned),
        dns_name(),
    ]
}

fn dns_pattern() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "*.a.example",
        "**.a.example",
        "*.*.b.example",
        "d*.a.example",
        "**",
    ])
    .prop_map(str::to_owned)
}

/// The broker's identity of a certificate whose subject is this one CN value.
fn certificate_with_cn(cn: &str) -> Identity {
    static KEY: OnceLock<rcgen::KeyPair> = OnceLock::new();
    let key =
        KEY.get_or_init(|| rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap());
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        rcgen::DnValue::Utf8String(cn.to_owned()),
    );
    let cert = params.self_signed(key).unwrap();
    Identity::from_der(cert.der()).unwrap()
}

/// The sample patterns mean what the properties above assume of them.
#[test]
fn sample_patterns() {
    let id = with("spiffe", "spiffe://a.example/device/d1");
    assert!(one("spiffe", "spiffe://a.example/device/*", &id));
    assert!(one("spiffe", "spiffe://a.example/**", &id));
    assert!(!one("spiffe", "spiffe://a.example/*", &id));
    assert!(!one("spiffe", "spiffe://a.example", &id));
}

/// Every key rejects an empty list at load: it would otherwise be a catch-all.
#[test]
fn empty_lists_are_rejected_for_every_key() {
    for field in FIELDS.iter().chain(&["sha256"]) {
        let problems = build(&[rule("r", &[(field, vec![])])]).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains(&format!("match.{field} is empty"))),
            "{field}: {problems:?}"
        );
    }
}
