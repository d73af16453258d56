//! The fuzz targets' bodies: one body, two drivers.
//!
//! `fuzz_targets/<name>.rs` hands libFuzzer's input to the function of the same name here,
//! and `tests/it/fuzz_seeds.rs` (stable toolchain, CI) includes this file as a module and
//! replays every file of `fuzz/seeds/<name>/` through the same function. So this file may
//! only use crates that both the fuzz crate and token-broker's tests have, and refers to
//! the broker as `token_broker::...`.
//!
//! Each body calls the public functions the server runs on untrusted input and panics only
//! on a crash or a violated property; refusals (`Err`) are ordinary outcomes.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{Map, Value};
use token_broker::broker::check_settings;
use token_broker::claims::{self, Subject};
use token_broker::clients::{ClientRules, MAX_SUBJECT_BYTES};
use token_broker::config::{ClientRuleConfig, Config};
use token_broker::flows::{self, FlowDeps, Registry};
use token_broker::http::parse_form;
use token_broker::identity::{Identity, IdentityError};
use token_broker::metrics::Metrics;
use token_broker::proxy::{client_address, read_header, ProxyError, ProxyPolicy};
use token_broker::signer::{LocalSigner, Signer};

/// A target's body: arbitrary bytes in, a panic only on a crash or a broken property.
pub type Body = fn(&[u8]);

/// Every target, by the name of its seed folder and fuzz binary.
pub const TARGETS: &[(&str, Body)] = &[
    ("form", form),
    ("proxy_header", proxy_header),
    ("identity", identity),
    ("identity_structured", identity_structured),
    ("config", config),
    ("jwt_encode", jwt_encode),
];

// ---------------------------------------------------------------------------------------
// form: the /token body parser (http::parse_form) and flow selection.

/// Parameters RFC 6749 3.2 says appear at most once; the broker reads exactly these.
const FORM_PARAMS: &[&str] = &[
    "grant_type",
    "client_id",
    "audience",
    "scope",
    "service_account",
    "target_audience",
    "format",
];

pub fn form(data: &[u8]) {
    let result = parse_form(data);
    let Ok(text) = std::str::from_utf8(data) else {
        let error = result.expect_err("a body that is not UTF-8 is refused");
        assert_eq!(error.code(), "invalid_request");
        return;
    };
    let pairs: Vec<(String, String)> = form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let named = |name: &'static str| pairs.iter().filter(move |(k, _)| k == name);
    let repeated = FORM_PARAMS.iter().any(|p| named(p).count() > 1);
    let request = match result {
        Err(error) => {
            assert_eq!(error.status(), 400, "{error}");
            assert!(
                matches!(error.code(), "invalid_request" | "unsupported_grant_type"),
                "{error:?}"
            );
            // Refusals quote at most 100 characters of the client's input.
            let description = error.description("00000000-0000-0000-0000-000000000000");
            assert!(
                description.chars().count() <= 1200,
                "unbounded description: {} chars",
                description.chars().count()
            );
            return;
        }
        Ok(request) => request,
    };
    assert!(!repeated, "a repeated parameter was accepted: {pairs:?}");
    let grant: Vec<_> = named("grant_type").collect();
    assert_eq!(grant.len(), 1);
    assert_eq!(grant[0].1, "client_credentials");
    assert_eq!(request.grant_type, "client_credentials");
    let fields = [
        ("client_id", &request.client_id),
        ("audience", &request.audience),
        ("scope", &request.scope),
        ("service_account", &request.service_account),
        ("target_audience", &request.target_audience),
        ("format", &request.format),
    ];
    for (name, field) in fields {
        // Empty values count as absent; others arrive exactly as decoded.
        let sent = named(name).map(|(_, v)| v.as_str()).find(|v| !v.is_empty());
        assert_eq!(field.as_deref(), sent, "{name}");
        if let Some(value) = field {
            assert!(!value.contains(char::REPLACEMENT_CHARACTER), "{name}");
        }
    }
    let scopes = request.scopes();
    assert!(scopes.windows(2).all(|w| w[0] < w[1]), "{scopes:?}");
    assert!(scopes
        .iter()
        .all(|s| !s.is_empty() && !s.contains(char::is_whitespace)));
    // The server's next step with the parameters.
    let _ = registry().select(&request);
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        Registry::build(&FlowDeps {
            issuer: "https://broker.example".into(),
            signer: signers()[0].clone(),
            google: None,
        })
    })
}

// ---------------------------------------------------------------------------------------
// proxy_header: PROXY v2 framing (proxy::read_header) and parsing (proxy::client_address).

/// The v2 signature (PROXY protocol spec, section 2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_MAX_HEADER: usize = 16 + 1024;

pub fn proxy_header(data: &[u8]) {
    let peer: SocketAddr = "192.0.2.10:40000".parse().unwrap();
    let mut stream = data;
    match block_on(read_header(&mut stream)) {
        Ok(header) => {
            assert!(data.starts_with(&header), "the header is what was sent");
            assert!(header.starts_with(V2_SIGNATURE));
            let declared = usize::from(u16::from_be_bytes([header[14], header[15]]));
            assert_eq!(header.len(), 16 + declared);
            assert!(header.len() <= V2_MAX_HEADER);
            check_client_address(&header, peer);
        }
        Err(ProxyError::Closed) => {
            let needed = if data.len() >= 16 {
                16 + usize::from(u16::from_be_bytes([data[14], data[15]]))
            } else {
                16
            };
            assert!(
                data.len() < needed,
                "Closed although {needed} bytes were there"
            );
        }
        Err(ProxyError::MissingHeader) => assert!(!data.starts_with(V2_SIGNATURE)),
        Err(ProxyError::TooLarge(length)) => {
            assert!(length > V2_MAX_HEADER - 16);
            assert!(data.starts_with(V2_SIGNATURE));
        }
        Err(other) => panic!("read_header cannot fail with {other:?}"),
    }
    // The parser also sees raw bytes (trailing data, short input).
    check_client_address(data, peer);
}

/// The address the broker believes must be the header's source address, read here
/// independently from the spec's fixed offsets (`LOCAL`, UNSPEC and unix: the peer).
fn check_client_address(header: &[u8], peer: SocketAddr) {
    let address = match client_address(header, peer) {
        Ok(address) => address,
        Err(ProxyError::Malformed(_)) => return,
        Err(other) => panic!("client_address cannot fail with {other:?}"),
    };
    assert!(header.starts_with(V2_SIGNATURE));
    let (version, command) = (header[12] >> 4, header[12] & 0x0F);
    assert_eq!(version, 2, "accepted a version {version} header");
    let expected = match (command, header[13] >> 4) {
        (0, _) => peer,
        (1, 1) => {
            let ip: [u8; 4] = header[16..20].try_into().unwrap();
            SocketAddr::from((ip, u16::from_be_bytes([header[24], header[25]])))
        }
        (1, 2) => {
            let ip: [u8; 16] = header[16..32].try_into().unwrap();
            SocketAddr::from((ip, u16::from_be_bytes([header[48], header[49]])))
        }
        (1, 0 | 3) => peer,
        (command, family) => panic!("accepted command {command} family {family}"),
    };
    assert_eq!(address, expected);
}

// ---------------------------------------------------------------------------------------
// identity: Identity::from_der on arbitrary DER (seeded with real certificates).

pub fn identity(data: &[u8]) {
    if let Ok(id) = Identity::from_der(data) {
        check_identity(&id, data);
    }
}

/// What every parsed identity guarantees, whatever the certificate.
fn check_identity(id: &Identity, der: &[u8]) {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    assert_eq!(id.sha256.hex(), hex(digest.as_ref()));
    assert_eq!(
        id.sha256.x5t_s256(),
        URL_SAFE_NO_PAD.encode(digest.as_ref())
    );
    let serial = &id.serial;
    assert!(
        !serial.is_empty() && serial.len().is_multiple_of(2),
        "{serial}"
    );
    assert!(serial
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    assert!(serial == "00" || !serial.starts_with("00"), "{serial}");
    for dns in &id.dns_sans {
        assert!(spec_dns_name(dns), "{dns:?}");
        assert_eq!(*dns, dns.to_ascii_lowercase());
    }
    for email in &id.email_sans {
        assert!(spec_email(email), "{email:?}");
    }
    for uri in &id.uri_sans {
        assert!(spec_uri(uri), "{uri:?}");
    }
    let spiffe: Vec<&String> = id
        .uri_sans
        .iter()
        .filter(|u| u.to_ascii_lowercase().starts_with("spiffe://"))
        .collect();
    match &id.spiffe_id {
        Some(spiffe_id) => {
            assert_eq!(spiffe, [spiffe_id]);
            assert!(spec_spiffe_id(spiffe_id), "{spiffe_id:?}");
        }
        None => assert!(spiffe.is_empty(), "{spiffe:?}"),
    }
    for name in [&id.subject, &id.issuer] {
        assert!(!name.contains('\0'), "{name:?}");
    }
    // `verify-cert` prints identities as JSON.
    serde_json::to_string(id).unwrap();
}

/// A DNS SAN as README/identity.rs document it: labels of letters, digits, '-', '_', at
/// most 63 bytes, 253 in all, an optional leading `*` label.
fn spec_dns_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').enumerate().all(|(i, label)| {
            (i == 0 && label == "*")
                || (!label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        })
}

/// A URI SAN (README, identity.rs): an absolute URI in RFC 3986 syntax: printable ASCII
/// without space or `"<>\\^`{|}`, a scheme and something after it, that `url` parses.
fn spec_uri(uri: &str) -> bool {
    let scheme = uri.split_once(':').map(|(s, _)| s).unwrap_or_default();
    let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    scheme_ok
        && uri.len() > scheme.len() + 1
        && uri
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b))
        && url::Url::parse(uri).is_ok()
}

/// An email SAN: one `@`, a local part without spaces or controls, a DNS domain.
fn spec_email(address: &str) -> bool {
    match address.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !local.chars().any(|c| c.is_whitespace() || c.is_control())
                && !domain.starts_with('*')
                && spec_dns_name(domain)
        }
        None => false,
    }
}

/// The SPIFFE-ID specification (SPIFFE-ID.md, sections 2 and 2.3): lowercase scheme and
/// trust domain of `[a-z0-9._-]`; no port, user info, query or fragment; a path, if any,
/// of non-empty segments of `[a-zA-Z0-9._-]` other than `.`/`..`, without a trailing
/// slash; at most 2048 bytes.
fn spec_spiffe_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let segment_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    };
    id.len() <= 2048
        && !trust_domain.is_empty()
        && trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        && path.is_none_or(|p| p.split('/').all(segment_ok))
}

// ---------------------------------------------------------------------------------------
// identity_structured: certificates made by rcgen from a line-based description
// (`cn=`, `o=`, `ou=`, `l=`, `st=`, `oid=`, `dns=`, `uri=`, `email=`, `ip=`, `serial=`
// hex, `not_before=`/`not_after=` Unix seconds); what comes out must be what went in.

pub fn identity_structured(data: &[u8]) {
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, SanType, SerialNumber};
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let mut attributes: Vec<(&str, String)> = Vec::new();
    let mut sans: Vec<(&str, String)> = Vec::new();
    let mut serial = None;
    for (key, value) in lines(data) {
        let dn = match key {
            "cn" => Some((DnType::CommonName, "CN")),
            "o" => Some((DnType::OrganizationName, "O")),
            "ou" => Some((DnType::OrganizationalUnitName, "OU")),
            "l" => Some((DnType::LocalityName, "L")),
            "st" => Some((DnType::StateOrProvinceName, "ST")),
            "oid" => Some((
                DnType::CustomDnType(vec![1, 3, 6, 1, 4, 1, 99999, 1]),
                "1.3.6.1.4.1.99999.1",
            )),
            _ => None,
        };
        if let Some((ty, label)) = dn {
            // rcgen keeps one value per attribute type.
            if attributes.iter().all(|(l, _)| *l != label) {
                params
                    .distinguished_name
                    .push(ty, DnValue::Utf8String(value.clone()));
                attributes.push((label, value));
            }
            continue;
        }
        let ia5 = |v: &String| rcgen::string::Ia5String::try_from(v.clone()).ok();
        let san = match key {
            "dns" => ia5(&value).map(SanType::DnsName),
            "uri" => ia5(&value).map(SanType::URI),
            "email" => ia5(&value).map(SanType::Rfc822Name),
            "ip" => value.parse::<IpAddr>().ok().map(SanType::IpAddress),
            "serial" => {
                serial = unhex(&value).filter(|b| !b.is_empty() && b.len() <= 20);
                None
            }
            "not_before" | "not_after" => {
                let time = value
                    .parse::<i64>()
                    .ok()
                    .filter(|t| (0..=253_402_300_799).contains(t))
                    .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok());
                match (key, time) {
                    ("not_before", Some(t)) => params.not_before = t,
                    (_, Some(t)) => params.not_after = t,
                    _ => {}
                }
                None
            }
            _ => None,
        };
        if let Some(san) = san {
            params.subject_alt_names.push(san);
            sans.push((key, value));
        }
    }
    if let Some(bytes) = &serial {
        params.serial_number = Some(SerialNumber::from_slice(bytes));
    }
    let Ok(cert) = params.self_signed(cert_key()) else {
        return;
    };
    let der = cert.der().as_ref();
    let spiffe: Vec<&String> = sans
        .iter()
        .filter(|(k, v)| *k == "uri" && v.to_ascii_lowercase().starts_with("spiffe://"))
        .map(|(_, v)| v)
        .collect();
    let well_formed = sans.iter().all(|(k, v)| match *k {
        "dns" => spec_dns_name(v),
        "email" => spec_email(v),
        "uri" => spec_uri(v),
        _ => true,
    }) && spiffe.len() <= 1
        && spiffe.iter().all(|s| spec_spiffe_id(s));
    let id = match Identity::from_der(der) {
        Ok(id) => id,
        Err(IdentityError::Malformed(e)) => panic!("a well-formed certificate is malformed: {e}"),
        Err(refusal) => {
            assert!(!well_formed, "refused a well-formed certificate: {refusal}");
            return;
        }
    };
    assert!(
        well_formed,
        "accepted a certificate with a bad SAN: {sans:?}"
    );
    check_identity(&id, der);

    let of = |kind: &str| -> Vec<String> {
        sans.iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    };
    let lower_domain = |e: String| match e.split_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => e,
    };
    let dns: Vec<String> = of("dns").iter().map(|d| d.to_ascii_lowercase()).collect();
    assert_eq!(id.dns_sans, dns);
    assert_eq!(id.uri_sans, of("uri"));
    assert_eq!(
        id.email_sans,
        of("email")
            .into_iter()
            .map(lower_domain)
            .collect::<Vec<_>>()
    );
    let ips: Vec<IpAddr> = of("ip").iter().map(|i| i.parse().unwrap()).collect();
    assert_eq!(id.ip_sans, ips);
    assert_eq!(id.spiffe_id.as_ref(), spiffe.first().copied());
    assert_eq!(id.not_before, params.not_before.unix_timestamp());
    assert_eq!(id.not_after, params.not_after.unix_timestamp());
    if let Some(bytes) = serial.filter(|b| b[0] != 0) {
        assert_eq!(id.serial, hex(&bytes));
    }
    let cn = attributes.iter().find(|(l, _)| *l == "CN").map(|(_, v)| v);
    assert_eq!(id.common_name.as_ref(), cn);

    // RFC 4514: most specific first, and no value can fake a separator.
    let rdns = split_unescaped(&id.subject, ',');
    let expected: Vec<String> = attributes
        .iter()
        .rev()
        .map(|(l, v)| format!("{l}={v}"))
        .collect();
    let got: Vec<String> = rdns
        .iter()
        .filter(|r| !r.is_empty() || !attributes.is_empty())
        .map(|rdn| {
            assert_eq!(split_unescaped(rdn, '+').len(), 1, "{rdn:?}");
            let (key, value) = rdn.split_once('=').expect("KEY=value");
            format!("{key}={}", unescape_dn_value(value))
        })
        .collect();
    assert_eq!(got, expected, "subject {:?}", id.subject);
    assert_eq!(id.issuer, id.subject);
}

fn cert_key() -> &'static rcgen::KeyPair {
    static KEY: OnceLock<rcgen::KeyPair> = OnceLock::new();
    KEY.get_or_init(|| rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
}

/// Splits RFC 4514 text at `separator` where it is not escaped.
fn split_unescaped(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == separator {
            parts.push(&text[start..i]);
            start = i + 1;
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Reverses RFC 4514 escaping: `\c` for a special character, `\00` for NUL.
fn unescape_dn_value(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('0') => {
                assert_eq!(chars.next(), Some('0'), "bad escape in {value:?}");
                out.push('\0');
            }
            Some(c) => {
                assert!(
                    "\"+,;<>\\ #=".contains(c),
                    "needless escape \\{c} in {value:?}"
                );
                out.push(c);
            }
            None => panic!("dangling escape in {value:?}"),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// config: Config::parse and every check that needs no file.

pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    let _ = check_settings(&config);
    let _ = ProxyPolicy::new(&config.server.proxy_protocol);
    let _ = token_broker::tls::protocol_versions(&config.server.tls_versions);
    let server = &config.server;
    for path in [&server.cert, &server.key, &server.client_ca]
        .into_iter()
        .chain(&server.crls)
    {
        let _ = config.path(path);
    }
    // A reload compares what tokens are minted under (Broker::rebuild).
    assert!(!token_broker::broker::minted_under_changed(
        &config, &config
    ));
    let default_audience = config.issuer.default_audience();
    let Ok(rules) = ClientRules::build(
        &config.clients,
        default_audience,
        config.issuer.token_ttl,
        &flows::names(),
    ) else {
        return;
    };
    assert_eq!(rules.len(), config.clients.len());
    for id in sample_identities() {
        if let Some((rule, matched)) = rules.find(id) {
            assert!(!rule.audiences.is_empty());
            assert!(rule.ttl >= Duration::from_secs(1) && rule.ttl <= Duration::from_secs(3600));
            if let Ok(subject) = rule.subject_for(id, &matched) {
                assert!(subject.len() <= MAX_SUBJECT_BYTES);
            }
            let _ = rule.check_rate(&id.sha256);
        }
    }
}

/// Identities rules get to see: the development device certificate's shape, and others.
fn sample_identities() -> &'static [Identity] {
    static IDS: OnceLock<Vec<Identity>> = OnceLock::new();
    IDS.get_or_init(|| {
        let device = make_identity(
            "device-1",
            &["device-1.devices.example.com"],
            &["spiffe://dev.token-broker.local/device/device-1"],
            &["ops@example.com"],
        );
        let gateway = make_identity("g1", &["g1.gw.example.com"], &[], &[]);
        let bare = make_identity("bare", &[], &["https://example.com/x"], &[]);
        vec![device, gateway, bare]
    })
}

fn make_identity(cn: &str, dns: &[&str], uris: &[&str], emails: &[&str]) -> Identity {
    use rcgen::{CertificateParams, DnType, SanType};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Example");
    for d in dns {
        params
            .subject_alt_names
            .push(SanType::DnsName((*d).try_into().unwrap()));
    }
    for u in uris {
        params
            .subject_alt_names
            .push(SanType::URI((*u).try_into().unwrap()));
    }
    for e in emails {
        params
            .subject_alt_names
            .push(SanType::Rfc822Name((*e).try_into().unwrap()));
    }
    let cert = params.self_signed(cert_key()).unwrap();
    Identity::from_der(cert.der()).unwrap()
}

// ---------------------------------------------------------------------------------------
// jwt_encode: claims::sign_id_token with the local signer, from a line-based description of the
// identity, the rule (`template=`, `claim=key=<TOML value>`, `ttl=`, `client_id=`) and the
// request (`aud=`, `iss=`, `flow=`, `now=`, `signer=es256|rs256`). The token must verify
// with the JWKS and decode to exactly the claims the broker meant.

pub fn jwt_encode(data: &[u8]) {
    let mut id = sample_identities()[0].clone();
    let (mut dns, mut uris, mut emails) = (Vec::new(), Vec::new(), Vec::new());
    // A rule as the config file gives it (fields not named here keep their defaults).
    let mut rule: ClientRuleConfig = toml::from_str("name = \"fuzz\"").unwrap();
    let (mut audience, mut issuer) = ("aud".to_owned(), "https://broker.example".to_owned());
    let (mut flow, mut now, mut rsa) = (flows::mtls_client_credentials::NAME, 1_700_000_000, false);
    for (key, value) in lines(data) {
        match key {
            "subject" => id.subject = value,
            "cn" => id.common_name = Some(value),
            "issuer" => id.issuer = value,
            "dns" => dns.push(value),
            "uri" => uris.push(value),
            "email" => emails.push(value),
            "spiffe" => id.spiffe_id = Some(value),
            "serial" => id.serial = value,
            // The certificate hash is bytes now; both keys of older corpora set it.
            "sha256" | "x5t" => {
                let digest =
                    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, value.as_bytes());
                id.sha256.0.copy_from_slice(digest.as_ref());
            }
            "name" => rule.name = value,
            "client_id" => rule.client_id = Some(value),
            "template" => rule.subject = Some(value),
            "claim" => {
                let Some((name, literal)) = value.split_once('=') else {
                    continue;
                };
                let Ok(mut table) = format!("v = {literal}").parse::<toml::Table>() else {
                    continue;
                };
                if let Some(v) = table.remove("v") {
                    rule.claims.insert(name.to_owned(), v);
                }
            }
            "ttl" => rule.ttl = value.parse().ok().map(Duration::from_secs),
            "aud" => audience = value,
            "iss" => issuer = value,
            "flow" => {
                if let Some(f) = flows::names().into_iter().find(|f| *f == value) {
                    flow = f;
                }
            }
            "now" => {
                if let Ok(t) = value.parse::<i64>() {
                    // Clocks from 1970 to the year 36812; the broker reads the system clock.
                    now = t.clamp(0, 1 << 40);
                }
            }
            "signer" => rsa = value == "rs256",
            _ => {}
        }
    }
    for (field, values) in [
        (&mut id.dns_sans, dns),
        (&mut id.uri_sans, uris),
        (&mut id.email_sans, emails),
    ] {
        if !values.is_empty() {
            *field = values;
        }
    }
    rule.audiences = vec![audience.clone()];
    let Ok(rules) = ClientRules::build(
        std::slice::from_ref(&rule),
        &audience,
        Duration::from_secs(300),
        &flows::names(),
    ) else {
        return;
    };
    let (rule, matched) = rules
        .find(&id)
        .expect("an empty match accepts every certificate");
    let Ok(subject) = rule.subject_for(&id, &matched) else {
        return;
    };
    assert!(subject.len() <= MAX_SUBJECT_BYTES);
    let who = Subject {
        identity: &id,
        rule,
        subject: &subject,
        audience: &audience,
    };
    let signer = &signers()[usize::from(rsa)];
    let token = block_on(claims::sign_id_token(
        signer.as_ref(),
        metrics(),
        &issuer,
        &who,
        flow,
        now,
    ))
    .expect("the local signer signs");
    let expected = claims::id_token_claims(&issuer, &who, flow, now, &token.jti);

    let (header, payload, raw_payload) = verify_jws(&token.jwt, signer.jwks().unwrap());
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["alg"], if rsa { "RS256" } else { "ES256" });
    assert_eq!(raw_payload, serde_json::to_vec(&expected).unwrap());
    // Static claims are flattened next to the broker's own: no name may appear twice
    // (a JSON parser would silently keep one of them).
    let mut names = member_names(&raw_payload);
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count, "a claim appears twice in the payload");
    assert!(
        json_same(
            &Value::Object(payload.clone()),
            &serde_json::to_value(&expected).unwrap()
        ),
        "decoded claims differ"
    );
    assert_eq!(payload["sub"], subject.as_str());
    assert_eq!(payload["aud"], audience.as_str());
    assert_eq!(payload["iss"], issuer.as_str());
    assert_eq!(payload["jti"], token.jti.as_str());
    assert_eq!(payload["exp"], token.expires_at);
    assert_eq!(token.expires_at - now, rule.ttl.as_secs() as i64);
    for (name, value) in &rule.claims {
        assert!(json_same(&payload[name], value), "static claim {name}");
    }
}

/// Checks a compact JWS against the JWKS (independently of the signer) and decodes it.
fn verify_jws(jwt: &str, jwks: &Value) -> (Map<String, Value>, Map<String, Value>, Vec<u8>) {
    use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    let b64 = |s: &str| {
        URL_SAFE_NO_PAD
            .decode(s)
            .expect("base64url without padding")
    };
    let header: Map<String, Value> = serde_json::from_slice(&b64(parts[0])).unwrap();
    let raw_payload = b64(parts[1]);
    let payload: Map<String, Value> = serde_json::from_slice(&raw_payload).unwrap();
    let signature = b64(parts[2]);
    let signed = &jwt[..parts[0].len() + 1 + parts[1].len()];
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .expect("the kid is in the JWKS");
    assert_eq!(jwk["alg"], header["alg"]);
    let member = |name: &str| b64(jwk[name].as_str().unwrap());
    let verified = match jwk["kty"].as_str() {
        Some("EC") => {
            let point = [vec![4], member("x"), member("y")].concat();
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                .verify(signed.as_bytes(), &signature)
        }
        Some("RSA") => RsaPublicKeyComponents {
            n: member("n"),
            e: member("e"),
        }
        .verify(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            signed.as_bytes(),
            &signature,
        ),
        other => panic!("unexpected kty {other:?}"),
    };
    assert!(verified.is_ok(), "the signature does not verify");
    (header, payload, raw_payload)
}

/// The member names of a JSON object, repeated names kept (`Map` would merge them).
fn member_names(json: &[u8]) -> Vec<String> {
    struct Names(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Names {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Visitor;
            impl<'de> serde::de::Visitor<'de> for Visitor {
                type Value = Names;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Names, A::Error> {
                    let mut names = Vec::new();
                    while let Some((name, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                        names.push(name);
                    }
                    Ok(Names(names))
                }
            }
            d.deserialize_map(Visitor)
        }
    }
    serde_json::from_slice::<Names>(json).unwrap().0
}

/// JSON equality, with numbers equal when they are the same `f64` within one ulp
/// (serde_json's default float parser is not exact to the last bit).
fn json_same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            x == y || x.to_bits().abs_diff(y.to_bits()) <= 1
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_same(v, w)))
        }
        _ => a == b,
    }
}

/// An ES256 and an RS256 local signer, loaded by `LocalSigner::load` from a temporary
/// key folder (deleted once loaded).
fn signers() -> &'static [Arc<dyn Signer>; 2] {
    static SIGNERS: OnceLock<[Arc<dyn Signer>; 2]> = OnceLock::new();
    SIGNERS.get_or_init(|| {
        let load = |key: rcgen::KeyPair| -> Arc<dyn Signer> {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("signing.pem");
            std::fs::write(&file, key.serialize_pem()).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let owner_only = std::fs::Permissions::from_mode(0o600);
                std::fs::set_permissions(&file, owner_only).unwrap();
            }
            let signer = LocalSigner::load(dir.path(), Duration::from_secs(86400)).unwrap();
            Arc::new(signer)
        };
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rsa =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .unwrap();
        [load(ec), load(rsa)]
    })
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// `key=value` lines (split at the first `=`; other lines ignored), lossily as UTF-8.
fn lines(data: &[u8]) -> impl Iterator<Item = (&'static str, String)> + '_ {
    const KEYS: &[&str] = &[
        "cn",
        "o",
        "ou",
        "l",
        "st",
        "oid",
        "dns",
        "uri",
        "email",
        "ip",
        "serial",
        "not_before",
        "not_after",
        "subject",
        "issuer",
        "spiffe",
        "sha256",
        "x5t",
        "name",
        "client_id",
        "template",
        "claim",
        "ttl",
        "aud",
        "iss",
        "flow",
        "now",
        "signer",
    ];
    data.split(|b| *b == b'\n').filter_map(|line| {
        let line = String::from_utf8_lossy(line);
        let (key, value) = line.split_once('=')?;
        let key = KEYS.iter().find(|k| **k == key)?;
        Some((*key, value.to_owned()))
    })
}

/// Runs a future that never waits (a read from a slice, local signing) to completion.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the future waited"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).ok())
        .collect()
}
