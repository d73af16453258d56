//! Name constraints of every form (RFC 5280 4.2.1.10: dNSName, iPAddress,
//! uniformResourceIdentifier, rfc822Name, directoryName; permitted and excluded), decided by
//! the broker (`Broker::authenticate`) and by `openssl verify` on the same generated chains
//! (root -> intermediate with the constraint -> leaf). Both must give the expected answer
//! for every case, but for the few where OpenSSL is known to be laxer than RFC 5280: those
//! cases name OpenSSL's answer and why, and the broker must still give the stricter one.
//! The policy rows are in `conformance.rs`.
//!
//! Besides the fixed cases, a generated corpus (`generated_cases`) draws directoryNames
//! (every string type, multi-valued RDNs in any order, whitespace and case variants,
//! values that do not decode), URIs (hosts, IPv4 and IPv6 literals) and emails (mixed case)
//! from a seeded RNG: a fixed seed unless `NAME_CONSTRAINTS_SEED=random` (or a number) says
//! otherwise; the seed is printed, and `NAME_CONSTRAINTS_SEED=<seed>` runs the same cases
//! again.

/// The seed of the generated corpus CI decides.
const FIXED_SEED: u64 = 20_261_208;

use std::process::Command;
use std::sync::Arc;

use rcgen::{
    CertificateParams, CidrSubnet, DistinguishedName, DnType, DnValue, GeneralSubtree,
    NameConstraints, SanType,
};
use token_broker::broker::Broker;
use token_broker::config::Config;
use token_broker::metrics::Metrics;

use crate::support::{self, raw_san, tlv, uri_name_constraint, Ca, LeafSpec, Setup};

/// The constraint of a case's intermediate.
#[derive(Clone)]
enum Base {
    Dns(&'static str),
    Ip(&'static str),
    Email(&'static str),
    Uri(&'static str),
    /// Organization.
    Org(&'static str),
    /// A directoryName given attribute by attribute (any string type, multi-valued RDNs).
    Dn(Dn),
}

/// A name of a case's leaf.
#[derive(Clone)]
enum Name {
    Dns(&'static str),
    Ip(&'static str),
    Email(&'static str),
    Uri(&'static str),
    /// Subject O= (a UTF8String; `Printable` for a PrintableString), then CN.
    Org(&'static str),
    PrintableOrg(&'static str),
    /// Subject emailAddress attribute (an IA5String), beside a SPIFFE ID.
    SubjectEmail(&'static str),
    /// A directoryName SAN O=, beside a SPIFFE ID; the subject is O=Acme, CN=leaf.
    SanOrg(&'static str),
    /// Subject O= in another string type ("T61", "BMP", "Universal", "IA5"), then CN.
    OrgAs(&'static str, &'static str),
    /// A directoryName SAN given attribute by attribute, beside a SPIFFE ID; the subject is
    /// empty, so that only the SAN meets the constraint.
    SanDn(Dn),
    /// A URI or an email built by the generated corpus.
    OwnedUri(String),
    OwnedEmail(String),
}

struct Case {
    base: Base,
    excluded: bool,
    name: Name,
    accept: bool,
    /// OpenSSL's answer where it is known to differ from `accept`, and why.
    openssl: Option<(bool, &'static str)>,
}

/// OpenSSL compares a URI's host as text: an IP literal is no host of an excluded subtree
/// to it, so it accepts what RFC 5280 4.2.1.10 says MUST be rejected ("If the constraint
/// is applied to a URI whose host is an IP address, the certificate MUST be rejected").
const OPENSSL_IP_URI: &str = "OpenSSL takes an IP literal for a host outside the excluded one; RFC 5280 4.2.1.10: MUST reject";

fn cases() -> Vec<Case> {
    use Base as B;
    use Name as N;
    let mut cases = Vec::new();
    let mut case = |base: Base, excluded: bool, name: Name, accept: bool| {
        cases.push(Case {
            base,
            excluded,
            name,
            accept,
            openssl: None,
        })
    };
    // dNSName: a domain and its subdomains; ".domain" only the subdomains.
    case(B::Dns("example.org"), false, N::Dns("a.example.org"), true);
    case(B::Dns("example.org"), false, N::Dns("example.org"), true);
    case(B::Dns("example.org"), false, N::Dns("a.other.org"), false);
    case(
        B::Dns("example.org"),
        false,
        N::Dns("badexample.org"),
        false,
    );
    case(B::Dns(".example.org"), false, N::Dns("a.example.org"), true);
    case(B::Dns(".example.org"), false, N::Dns("example.org"), false);
    case(B::Dns("example.org"), true, N::Dns("a.example.org"), false);
    case(B::Dns("example.org"), true, N::Dns("a.other.org"), true);
    case(
        B::Dns("example.org"),
        false,
        N::Uri("spiffe://other.org/x"),
        true,
    );
    // iPAddress: CIDR ranges, v4 and v6.
    case(B::Ip("10.0.0.0/8"), false, N::Ip("10.1.2.3"), true);
    case(B::Ip("10.0.0.0/8"), false, N::Ip("192.168.1.1"), false);
    case(B::Ip("10.0.0.0/8"), false, N::Ip("2001:db8::1"), false);
    case(B::Ip("2001:db8::/32"), false, N::Ip("2001:db8::1"), true);
    case(B::Ip("2001:db8::/32"), false, N::Ip("2001:db9::1"), false);
    case(B::Ip("10.0.0.0/8"), true, N::Ip("10.1.2.3"), false);
    case(B::Ip("10.0.0.0/8"), true, N::Ip("192.168.1.1"), true);
    case(B::Ip("2001:db8::/32"), true, N::Ip("2001:db8::1"), false);
    case(B::Ip("2001:db8::/32"), true, N::Ip("2001:db9::1"), true);
    // uniformResourceIdentifier: the URI's host; "example.org" is that host only.
    case(
        B::Uri("example.org"),
        false,
        N::Uri("spiffe://example.org/device/1"),
        true,
    );
    case(
        B::Uri("example.org"),
        false,
        N::Uri("https://Example.ORG/x"),
        true,
    );
    case(
        B::Uri("example.org"),
        false,
        N::Uri("spiffe://other.org/x"),
        false,
    );
    case(
        B::Uri("example.org"),
        false,
        N::Uri("spiffe://a.example.org/x"),
        false,
    );
    case(
        B::Uri("example.org"),
        false,
        N::Uri("https://example.org:8443/x"),
        true,
    );
    case(
        B::Uri(".example.org"),
        false,
        N::Uri("spiffe://a.example.org/x"),
        true,
    );
    case(
        B::Uri(".example.org"),
        false,
        N::Uri("spiffe://example.org/x"),
        false,
    );
    case(B::Uri("example.org"), false, N::Dns("a.other.org"), true);
    // A whole URI is no host: such a constraint matches nothing.
    case(
        B::Uri("spiffe://example.org"),
        false,
        N::Uri("spiffe://example.org/device/1"),
        false,
    );
    case(
        B::Uri("example.org"),
        true,
        N::Uri("spiffe://example.org/device/1"),
        false,
    );
    case(
        B::Uri("example.org"),
        true,
        N::Uri("spiffe://other.org/x"),
        true,
    );
    case(
        B::Uri(".example.org"),
        true,
        N::Uri("spiffe://a.example.org/x"),
        false,
    );
    case(
        B::Uri(".example.org"),
        true,
        N::Uri("spiffe://example.org/x"),
        true,
    );
    // rfc822Name: a mailbox, a host, or ".domain" (its subdomains).
    case(
        B::Email("alice@example.org"),
        false,
        N::Email("alice@example.org"),
        true,
    );
    case(
        B::Email("alice@example.org"),
        false,
        N::Email("alice@EXAMPLE.org"),
        true,
    );
    case(
        B::Email("alice@example.org"),
        false,
        N::Email("Alice@example.org"),
        false,
    );
    case(
        B::Email("alice@example.org"),
        false,
        N::Email("bob@example.org"),
        false,
    );
    case(
        B::Email("example.org"),
        false,
        N::Email("bob@example.org"),
        true,
    );
    case(
        B::Email("example.org"),
        false,
        N::Email("bob@mail.example.org"),
        false,
    );
    case(
        B::Email("example.org"),
        false,
        N::Email("bob@other.org"),
        false,
    );
    case(
        B::Email(".example.org"),
        false,
        N::Email("bob@mail.example.org"),
        true,
    );
    case(
        B::Email(".example.org"),
        false,
        N::Email("bob@example.org"),
        false,
    );
    case(
        B::Email("example.org"),
        true,
        N::Email("bob@example.org"),
        false,
    );
    case(
        B::Email("example.org"),
        true,
        N::Email("bob@other.org"),
        true,
    );
    case(
        B::Email("alice@example.org"),
        true,
        N::Email("alice@example.org"),
        false,
    );
    case(
        B::Email("alice@example.org"),
        true,
        N::Email("bob@example.org"),
        true,
    );
    case(
        B::Email("example.org"),
        false,
        N::SubjectEmail("bob@example.org"),
        true,
    );
    case(
        B::Email("example.org"),
        false,
        N::SubjectEmail("bob@other.org"),
        false,
    );
    case(
        B::Email("example.org"),
        true,
        N::SubjectEmail("bob@example.org"),
        false,
    );
    case(
        B::Email("example.org"),
        false,
        N::Uri("spiffe://other.org/x"),
        true,
    );
    // directoryName: the subject begins with the constraint's RDNs (case and string type
    // aside, as OpenSSL compares).
    case(B::Org("Acme"), false, N::Org("Acme"), true);
    case(B::Org("Acme"), false, N::Org("Other"), false);
    case(B::Org("Acme"), false, N::Org("AcmeCorp"), false);
    case(B::Org("Acme"), false, N::PrintableOrg("ACME"), true);
    case(
        B::Org("Acme"),
        false,
        N::Uri("spiffe://example.org/x"),
        false,
    );
    case(B::Org("Evil"), true, N::Org("Evil"), false);
    case(B::Org("Evil"), true, N::Org("evil"), false);
    case(B::Org("Evil"), true, N::Org("Acme"), true);
    case(B::Org("Acme"), false, N::SanOrg("Acme"), true);
    case(B::Org("Acme"), false, N::SanOrg("Other"), false);
    case(B::Org("Evil"), true, N::SanOrg("Evil"), false);
    // Issue 24 item 6: an excluded O=Evil (UTF8String) is not escaped by the same value in
    // another string type (OpenSSL reads a T61String as Latin-1).
    for kind in ["T61", "BMP", "Universal", "IA5"] {
        case(B::Org("Evil"), true, N::OrgAs(kind, "Evil"), false);
        case(B::Org("Evil"), true, N::OrgAs(kind, "  eVIL "), false);
        case(B::Org("Evil"), true, N::OrgAs(kind, "Acme"), true);
        case(B::Org("Acme"), false, N::OrgAs(kind, "ACME"), true);
        case(B::Org("Acme"), false, N::OrgAs(kind, "Other"), false);
    }
    // ... nor by a multi-valued RDN in another order, with other whitespace and case.
    let evil_ops = vec![vec![Ava::text(O, UTF8, "Evil"), Ava::text(OU, UTF8, "Ops")]];
    let reordered = vec![vec![
        Ava::text(OU, UTF8, "  ops  "),
        Ava::text(O, UTF8, "Evil"),
    ]];
    case(
        B::Dn(evil_ops.clone()),
        true,
        N::SanDn(reordered.clone()),
        false,
    );
    case(B::Dn(evil_ops.clone()), false, N::SanDn(reordered), true);
    let one_of_two = vec![vec![Ava::text(O, UTF8, "Evil")]];
    case(B::Dn(evil_ops.clone()), true, N::SanDn(one_of_two), true);
    // Each attribute of the constraint's RDN pairs with its own attribute of the name's.
    let evil_twice = vec![vec![Ava::text(O, UTF8, "Evil"), Ava::text(O, T61, "evil")]];
    case(
        B::Dn(evil_ops.clone()),
        false,
        N::SanDn(evil_twice.clone()),
        false,
    );
    case(B::Dn(evil_ops.clone()), true, N::SanDn(evil_twice), true);
    // A BMPString is UCS-2: a UTF-16 surrogate pair in one does not decode (OpenSSL cannot
    // read it either), so it is refused, permitted or excluded.
    let clef = vec![vec![Ava::text(O, UTF8, "\u{1d11e}")]];
    let clef_bmp = vec![vec![Ava {
        text: None,
        ..Ava::text(O, BMP, "\u{1d11e}")
    }]];
    case(B::Dn(clef.clone()), true, N::SanDn(clef_bmp.clone()), false);
    case(B::Dn(clef), false, N::SanDn(clef_bmp), false);
    // Latin-1 beyond ASCII: a T61String's 0xfc is the UTF8String's "\u{fc}".
    let zurich = vec![vec![Ava::text(L, UTF8, "Z\u{fc}rich")]];
    let zurich_t61 = vec![vec![Ava::text(L, T61, "Z\u{fc}RICH")]];
    case(
        B::Dn(zurich.clone()),
        true,
        N::SanDn(zurich_t61.clone()),
        false,
    );
    case(B::Dn(zurich), false, N::SanDn(zurich_t61), true);
    // A value that does not decode is refused under any directoryName constraint (OpenSSL
    // cannot read the certificate's names at all).
    let bad_utf8 = vec![vec![Ava::raw(O, UTF8, b"Ev\xffil")]];
    case(
        B::Dn(evil_ops.clone()),
        true,
        N::SanDn(bad_utf8.clone()),
        false,
    );
    case(B::Org("Acme"), false, N::SanDn(bad_utf8), false);
    // URIs whose host is an IP literal are refused under any URI constraint.
    let mut laxer = Vec::new();
    // A PrintableString holds ASCII only: OpenSSL reads a byte above 0x7f as Latin-1, the
    // broker refuses it (a UTF-8 reading would be another name).
    laxer.push(Case {
        base: B::Dn(vec![vec![Ava::text(O, UTF8, "\u{c9}vil")]]),
        excluded: false,
        name: N::SanDn(vec![vec![Ava::raw(O, PRINTABLE, b"\xc9vil")]]),
        accept: false,
        openssl: Some((true, "OpenSSL reads a PrintableString as Latin-1")),
    });
    for uri in [
        "https://10.0.0.1/x",
        "https://10.0.0.1:8443/x",
        "https://[2001:db8::1]/x",
        "https://[2001:db8::1]:8443/x",
    ] {
        case(B::Uri("example.org"), false, N::Uri(uri), false);
        case(B::Uri(".example.org"), false, N::Uri(uri), false);
        laxer.push(Case {
            base: B::Uri("example.org"),
            excluded: true,
            name: N::Uri(uri),
            accept: false,
            openssl: Some((true, OPENSSL_IP_URI)),
        });
    }
    // A URI with userinfo is refused under any URI constraint: OpenSSL reads
    // "example.org@evil.org" as the host, which an excluded evil.org does not hold.
    case(
        B::Uri("example.org"),
        false,
        N::Uri("https://device@example.org/x"),
        false,
    );
    laxer.push(Case {
        base: B::Uri("evil.org"),
        excluded: true,
        name: N::Uri("https://example.org@evil.org/x"),
        accept: false,
        openssl: Some((true, "OpenSSL takes userinfo for part of the host")),
    });
    // rfc822Name: the local part exactly, the domain without case, on both sides.
    case(
        B::Email("Alice@Example.ORG"),
        false,
        N::Email("Alice@example.org"),
        true,
    );
    case(
        B::Email("Alice@Example.ORG"),
        false,
        N::Email("alice@example.org"),
        false,
    );
    case(
        B::Email("Alice@Example.ORG"),
        true,
        N::Email("Alice@EXAMPLE.org"),
        false,
    );
    case(
        B::Email("Alice@Example.ORG"),
        true,
        N::Email("ALICE@example.org"),
        true,
    );
    case(
        B::Email(".Example.ORG"),
        true,
        N::Email("bob@Mail.EXAMPLE.org"),
        false,
    );
    case(
        B::Email("EXAMPLE.org"),
        false,
        N::Email("Bob@example.ORG"),
        true,
    );
    cases.extend(laxer);
    cases
}

/// Attribute types of the generated names.
const O: &[u8] = &[0x55, 0x04, 0x0a];
const OU: &[u8] = &[0x55, 0x04, 0x0b];
const CN: &[u8] = &[0x55, 0x04, 0x03];
const L: &[u8] = &[0x55, 0x04, 0x07];

/// String types (their DER tags).
const UTF8: u8 = 0x0c;
const PRINTABLE: u8 = 0x13;
const T61: u8 = 0x14;
const IA5: u8 = 0x16;
const UNIVERSAL: u8 = 0x1c;
const BMP: u8 = 0x1e;

/// One attribute of a name: its type, its string type and encoded value, and the text that
/// value holds (`None`: it does not decode), from which the expected answer is reckoned.
#[derive(Clone)]
struct Ava {
    oid: &'static [u8],
    tag: u8,
    value: Vec<u8>,
    text: Option<String>,
}

/// RDNs of attributes, in encoded order.
type Dn = Vec<Vec<Ava>>;

impl Ava {
    /// `text` encoded as `tag` (UTF8, Printable and IA5 as bytes, T61 as Latin-1, BMP as
    /// UTF-16BE, which is UCS-2 within the BMP, Universal as UTF-32BE).
    fn text(oid: &'static [u8], tag: u8, text: &str) -> Ava {
        let value = match tag {
            T61 => text.chars().map(|c| u8::try_from(c).unwrap()).collect(),
            BMP => text.encode_utf16().flat_map(u16::to_be_bytes).collect(),
            UNIVERSAL => text
                .chars()
                .flat_map(|c| u32::from(c).to_be_bytes())
                .collect(),
            _ => text.as_bytes().to_vec(),
        };
        Ava {
            oid,
            tag,
            value,
            text: Some(text.to_owned()),
        }
    }

    /// Bytes that do not decode as `tag`.
    fn raw(oid: &'static [u8], tag: u8, value: &[u8]) -> Ava {
        Ava {
            oid,
            tag,
            value: value.to_vec(),
            text: None,
        }
    }

    fn der(&self) -> Vec<u8> {
        tlv(
            0x30,
            &[tlv(0x06, self.oid), tlv(self.tag, &self.value)].concat(),
        )
    }
}

/// The Name SEQUENCE of `dn`, its RDNs' attributes in the order given (unsorted SETs).
fn dn_der(dn: &Dn) -> Vec<u8> {
    let rdns: Vec<u8> = dn
        .iter()
        .flat_map(|rdn| tlv(0x31, &rdn.iter().flat_map(Ava::der).collect::<Vec<u8>>()))
        .collect();
    tlv(0x30, &rdns)
}

fn describe_dn(dn: &Dn) -> String {
    let ava = |a: &Ava| {
        let kind = match a.oid {
            O => "O",
            OU => "OU",
            CN => "CN",
            L => "L",
            _ => "?",
        };
        let tag = match a.tag {
            UTF8 => "UTF8",
            PRINTABLE => "Printable",
            T61 => "T61",
            IA5 => "IA5",
            UNIVERSAL => "Universal",
            BMP => "BMP",
            _ => "other",
        };
        match &a.text {
            Some(text) => format!("{kind}={text:?}({tag})"),
            None => format!("{kind}=0x{}({tag}, undecodable)", hex(&a.value)),
        }
    };
    let rdns: Vec<String> = dn
        .iter()
        .map(|rdn| rdn.iter().map(ava).collect::<Vec<_>>().join("+"))
        .collect();
    rdns.join(",")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The expected answer, reckoned apart from both implementations: RFC 5280 7.1 with
/// OpenSSL's canonical values (any string type, ASCII case and runs of whitespace ignored),
/// RDNs as multisets of (type, value).
fn dn_within(name: &Dn, constraint: &Dn) -> bool {
    fn canonical(text: &str) -> String {
        let space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r');
        text.split(space)
            .filter(|word| !word.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
            .to_ascii_lowercase()
    }
    fn rdn_key(rdn: &[Ava]) -> Vec<(Vec<u8>, String)> {
        let mut key: Vec<_> = rdn
            .iter()
            .map(|a| {
                (
                    a.oid.to_vec(),
                    canonical(a.text.as_deref().unwrap_or_default()),
                )
            })
            .collect();
        key.sort();
        key
    }
    name.len() >= constraint.len()
        && constraint
            .iter()
            .zip(name)
            .all(|(c, n)| rdn_key(c) == rdn_key(n))
}

fn decodable(dn: &Dn) -> bool {
    dn.iter().flatten().all(|a| a.text.is_some())
}

/// How many cases of each form the generated corpus holds.
const GENERATED_DIRECTORY_NAMES: usize = 80;
const GENERATED_URIS: usize = 30;
const GENERATED_EMAILS: usize = 30;

/// The generated corpus for `seed`: constraints and names drawn at random, each case's
/// expected answer reckoned by `dn_within` or the rules of RFC 5280 4.2.1.10 written out
/// below, never by the broker's matcher.
fn generated_cases(seed: u64) -> Vec<Case> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cases = Vec::new();
    for _ in 0..GENERATED_DIRECTORY_NAMES {
        let excluded = rng.bool();
        let constraint = random_dn(&mut rng);
        let name = variant(&mut rng, &constraint);
        let accept = decodable(&name) && (dn_within(&name, &constraint) != excluded);
        cases.push(Case {
            base: Base::Dn(constraint),
            excluded,
            name: Name::SanDn(name),
            accept,
            openssl: None,
        });
    }
    for _ in 0..GENERATED_URIS {
        let excluded = rng.bool();
        let constraint = pick(
            &mut rng,
            &["example.org", "Example.ORG", ".example.org", ".EXAMPLE.org"],
        );
        let ip = rng.u8(0..3) == 0;
        let host = if ip {
            match rng.bool() {
                true => format!(
                    "{}.{}.{}.{}",
                    rng.u8(..),
                    rng.u8(..),
                    rng.u8(..),
                    rng.u8(1..)
                ),
                false => pick(&mut rng, &["[2001:db8::1]", "[::1]", "[2001:DB8::a:b]"]).to_string(),
            }
        } else {
            let host = pick(
                &mut rng,
                &[
                    "example.org",
                    "a.example.org",
                    "b.a.example.org",
                    "other.org",
                    "badexample.org",
                    "example.org.evil.net",
                ],
            );
            flip_case(&mut rng, host)
        };
        let port = pick(&mut rng, &["", ":8443"]);
        let path = pick(&mut rng, &["", "/", "/device/1"]);
        // https: a SPIFFE ID's trust domain must be lowercase, or the broker refuses it for
        // that before any constraint.
        let uri = format!("https://{host}{port}{path}");
        let (accept, openssl) = if ip {
            // RFC 5280 4.2.1.10: MUST reject, permitted or excluded.
            (false, excluded.then_some((true, OPENSSL_IP_URI)))
        } else {
            (host_within(&host, constraint) != excluded, None)
        };
        cases.push(Case {
            base: Base::Uri(constraint),
            excluded,
            name: Name::OwnedUri(uri),
            accept,
            openssl,
        });
    }
    for _ in 0..GENERATED_EMAILS {
        let excluded = rng.bool();
        let constraint = pick(
            &mut rng,
            &[
                "alice@example.org",
                "Alice@Example.ORG",
                "example.org",
                "EXAMPLE.org",
                ".example.org",
                ".Example.ORG",
            ],
        );
        let local = pick(&mut rng, &["alice", "Alice", "ALICE", "bob"]);
        let domain = pick(&mut rng, &["example.org", "mail.example.org", "other.org"]);
        let domain = flip_case(&mut rng, domain);
        let email = format!("{local}@{domain}");
        // A mailbox: the local part exactly, the domain without case; else the domain as a
        // URI's host.
        let within = match constraint.rsplit_once('@') {
            Some((want_local, want_domain)) => {
                local == want_local && domain.eq_ignore_ascii_case(want_domain)
            }
            None => host_within(&domain, constraint),
        };
        cases.push(Case {
            base: Base::Email(constraint),
            excluded,
            name: Name::OwnedEmail(email),
            accept: within != excluded,
            openssl: None,
        });
    }
    cases
}

/// RFC 5280 4.2.1.10 for URI hosts and email domains: ".domain" holds the hosts below it,
/// anything else that host only; without case.
fn host_within(host: &str, constraint: &str) -> bool {
    let (host, constraint) = (host.to_ascii_lowercase(), constraint.to_ascii_lowercase());
    match constraint.starts_with('.') {
        true => host.len() > constraint.len() && host.ends_with(&constraint),
        false => host == constraint,
    }
}

fn pick<T: Copy>(rng: &mut fastrand::Rng, items: &[T]) -> T {
    items[rng.usize(..items.len())]
}

fn flip_case(rng: &mut fastrand::Rng, text: &str) -> String {
    text.chars()
        .map(|c| match rng.bool() {
            true => c.to_ascii_uppercase(),
            false => c.to_ascii_lowercase(),
        })
        .collect()
}

/// Values of the generated names: ASCII, Latin-1 beyond ASCII, and beyond the BMP.
const VALUES: &[&str] = &[
    "Evil",
    "Ops",
    "Acme Corp",
    "R&D",
    "Soci\u{e9}t\u{e9} G\u{e9}n\u{e9}rale",
    "Z\u{fc}rich",
    "\u{1d11e} Music",
];

/// A constraint: one or two RDNs of one to three attributes.
fn random_dn(rng: &mut fastrand::Rng) -> Dn {
    (0..rng.usize(1..=2))
        .map(|_| {
            (0..rng.usize(1..=3))
                .map(|_| {
                    let oid = pick(rng, &[O, OU, CN, L]);
                    let text = pick(rng, VALUES);
                    random_encoding(rng, oid, text)
                })
                .collect()
        })
        .collect()
}

/// `text` in a string type drawn from those that can hold it.
fn random_encoding(rng: &mut fastrand::Rng, oid: &'static [u8], text: &str) -> Ava {
    let printable = text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " '()+,-./:=?".contains(c));
    let mut tags = vec![UTF8, UNIVERSAL];
    if text.chars().all(|c| u32::from(c) <= 0xff) {
        tags.push(T61);
    }
    if text.chars().all(|c| u32::from(c) <= 0xffff) {
        // (Beyond the BMP a BMPString would need a UTF-16 surrogate pair, which is no
        // UCS-2: a fixed case in `cases`.)
        tags.push(BMP);
    }
    if text.is_ascii() {
        tags.push(IA5);
    }
    if printable {
        tags.push(PRINTABLE);
    }
    Ava::text(oid, pick(rng, &tags), text)
}

/// `text` as the same value to OpenSSL and RFC 5280 7.1: ASCII case flipped, whitespace
/// added around it and runs of it in place of its spaces.
fn same_text(rng: &mut fastrand::Rng, text: &str) -> String {
    let spaces = ["", " ", "  ", "\t", " \t "];
    let mut out = String::new();
    out.push_str(pick(rng, &spaces));
    for c in text.chars() {
        match c {
            ' ' => out.push_str(pick(rng, &[" ", "  ", "\t", " \n "])),
            c if rng.bool() => out.push(c.to_ascii_uppercase()),
            c => out.push(c.to_ascii_lowercase()),
        }
    }
    out.push_str(pick(rng, &spaces));
    out
}

/// A name for `constraint`: the same RDNs (each attribute re-encoded in another string type,
/// with case and whitespace variants, multi-valued RDNs shuffled), perhaps with more RDNs
/// after them, and perhaps one change that takes it out of the subtree (or leaves it in:
/// `dn_within` decides), or one value that does not decode.
fn variant(rng: &mut fastrand::Rng, constraint: &Dn) -> Dn {
    let mut name: Dn = constraint
        .iter()
        .map(|rdn| {
            let mut rdn: Vec<Ava> = rdn
                .iter()
                .map(|a| {
                    let text = same_text(rng, a.text.as_deref().unwrap_or_default());
                    random_encoding(rng, a.oid, &text)
                })
                .collect();
            rng.shuffle(&mut rdn);
            rdn
        })
        .collect();
    if rng.bool() {
        name.push(vec![Ava::text(CN, UTF8, "leaf")]);
    }
    let r = rng.usize(..name.len());
    match rng.u8(0..12) {
        // One character changed (the same ASCII letter in another case is no change).
        0 => {
            let a = rng.usize(..name[r].len());
            let text = name[r][a].text.clone().unwrap_or_default();
            let mut chars: Vec<char> = text.chars().collect();
            let i = rng.usize(..chars.len());
            chars[i] = if chars[i].eq_ignore_ascii_case(&'x') {
                'q'
            } else {
                'x'
            };
            let text: String = chars.into_iter().collect();
            name[r][a] = random_encoding(rng, name[r][a].oid, &text);
        }
        // A space inside a word.
        1 => {
            let a = rng.usize(..name[r].len());
            let text = name[r][a].text.clone().unwrap_or_default();
            let trimmed = text.trim();
            let mid = trimmed.char_indices().nth(1).map_or(0, |(i, _)| i);
            let text = format!("{} {}", &trimmed[..mid], &trimmed[mid..]);
            name[r][a] = random_encoding(rng, name[r][a].oid, &text);
        }
        // An attribute more, or one fewer, in an RDN.
        2 => {
            let text = pick(rng, VALUES);
            let extra = random_encoding(rng, OU, text);
            name[r].push(extra);
        }
        3 if name[r].len() > 1 => {
            name[r].pop();
        }
        // Another attribute type.
        4 => {
            let a = rng.usize(..name[r].len());
            name[r][a].oid = if name[r][a].oid == L { O } else { L };
        }
        // RDNs in another order, or too few.
        5 if name.len() > 1 => name.swap(0, 1),
        6 if name.len() > 1 => {
            name.remove(0);
        }
        // A value that does not decode as its type.
        7 => {
            let a = rng.usize(..name[r].len());
            let oid = name[r][a].oid;
            name[r][a] = match rng.u8(0..4) {
                0 => Ava::raw(oid, UTF8, b"Ev\xc3il"),
                1 => Ava::raw(oid, BMP, b"\x00E\x00"),
                2 => Ava::raw(oid, UNIVERSAL, b"\x00\x11\x00\x00"),
                _ => Ava::raw(oid, UTF8, b"\xed\xa0\x80"),
            };
        }
        _ => {}
    }
    name
}

fn org(value: DnValue) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, value);
    dn
}

fn ia5(text: &str) -> rcgen::string::Ia5String {
    text.to_owned().try_into().unwrap()
}

fn intermediate(root: &Ca, base: &Base, excluded: bool) -> Ca {
    let subtree = match base {
        Base::Dns(dns) => GeneralSubtree::DnsName(dns.to_string()),
        Base::Ip(cidr) => GeneralSubtree::IpAddress(cidr.parse::<CidrSubnet>().unwrap()),
        Base::Email(email) => GeneralSubtree::Rfc822Name(email.to_string()),
        Base::Org(o) => GeneralSubtree::DirectoryName(org(DnValue::from(*o))),
        Base::Uri(host) => {
            return root.intermediate_with("URI Constrained CA", |p| {
                p.custom_extensions
                    .push(uri_name_constraint(host, excluded))
            })
        }
        Base::Dn(dn) => {
            // rcgen writes no multi-valued RDNs: the extension by hand.
            let subtree = tlv(0x30, &tlv(0xa4, &dn_der(dn)));
            let tag = if excluded { 0xa1 } else { 0xa0 };
            let value = tlv(0x30, &tlv(tag, &subtree));
            return root.intermediate_with("DN Constrained CA", |p| {
                p.custom_extensions
                    .push(support::extension(&[2, 5, 29, 30], true, value))
            });
        }
    };
    root.intermediate_with("Constrained CA", |p| {
        let (permitted_subtrees, excluded_subtrees) = match excluded {
            false => (vec![subtree], vec![]),
            true => (vec![], vec![subtree]),
        };
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees,
            excluded_subtrees,
        });
    })
}

/// The leaf's names: the SAN or subject attribute of `name`. Leaves named by their subject
/// alone also carry a SPIFFE ID outside every constraint but the URI ones.
fn leaf_names(name: &Name, params: &mut CertificateParams) {
    let cn = DnValue::from("leaf");
    let with_subject = |params: &mut CertificateParams, mut dn: DistinguishedName| {
        dn.push(DnType::CommonName, cn.clone());
        params.distinguished_name = dn;
        params
            .subject_alt_names
            .push(SanType::URI(ia5("spiffe://example.org/dn")));
    };
    match name {
        Name::Dns(dns) => params.subject_alt_names.push(SanType::DnsName(ia5(dns))),
        Name::Ip(ip) => params
            .subject_alt_names
            .push(SanType::IpAddress(ip.parse().unwrap())),
        Name::Email(email) => params
            .subject_alt_names
            .push(SanType::Rfc822Name(ia5(email))),
        Name::Uri(uri) => params.subject_alt_names.push(SanType::URI(ia5(uri))),
        Name::Org(o) => with_subject(params, org(DnValue::from(*o))),
        Name::PrintableOrg(o) => with_subject(
            params,
            org(DnValue::PrintableString(o.to_string().try_into().unwrap())),
        ),
        Name::SubjectEmail(email) => {
            let mut dn = DistinguishedName::new();
            dn.push(
                DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
                DnValue::Ia5String(ia5(email)),
            );
            with_subject(params, dn);
        }
        Name::SanOrg(o) => {
            const ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];
            let attribute = [tlv(0x06, ORGANIZATION), tlv(0x0c, o.as_bytes())].concat();
            let name = tlv(0x30, &tlv(0x31, &tlv(0x30, &attribute)));
            params.custom_extensions.push(raw_san(&[
                tlv(0xa4, &name),
                tlv(0x86, b"spiffe://example.org/dn"),
            ]));
            let mut dn = org(DnValue::from("Acme"));
            dn.push(DnType::CommonName, cn);
            params.distinguished_name = dn;
        }
        Name::OrgAs(kind, o) => {
            let value = match *kind {
                "T61" => DnValue::TeletexString((*o).try_into().unwrap()),
                "BMP" => DnValue::BmpString((*o).try_into().unwrap()),
                "Universal" => DnValue::UniversalString((*o).try_into().unwrap()),
                "IA5" => DnValue::Ia5String(ia5(o)),
                other => panic!("no string type {other}"),
            };
            with_subject(params, org(value));
        }
        Name::SanDn(dn) => {
            params.custom_extensions.push(raw_san(&[
                tlv(0xa4, &dn_der(dn)),
                tlv(0x86, b"spiffe://example.org/dn"),
            ]));
            params.distinguished_name = DistinguishedName::new();
        }
        Name::OwnedUri(uri) => params.subject_alt_names.push(SanType::URI(ia5(uri))),
        Name::OwnedEmail(email) => params
            .subject_alt_names
            .push(SanType::Rfc822Name(ia5(email))),
    }
}

fn describe(case: &Case) -> String {
    let base = match &case.base {
        Base::Dns(v) => format!("dNSName {v}"),
        Base::Ip(v) => format!("iPAddress {v}"),
        Base::Email(v) => format!("rfc822Name {v}"),
        Base::Uri(v) => format!("URI {v}"),
        Base::Org(v) => format!("directoryName O={v}"),
        Base::Dn(dn) => format!("directoryName {}", describe_dn(dn)),
    };
    let name = match &case.name {
        Name::Dns(v) => format!("DNS {v}"),
        Name::Ip(v) => format!("IP {v}"),
        Name::Email(v) => format!("email {v}"),
        Name::Uri(v) => format!("URI {v}"),
        Name::Org(v) => format!("subject O={v}"),
        Name::PrintableOrg(v) => format!("subject O={v} (PrintableString)"),
        Name::SubjectEmail(v) => format!("subject emailAddress {v}"),
        Name::SanOrg(v) => format!("SAN directoryName O={v} (subject O=Acme)"),
        Name::OrgAs(kind, v) => format!("subject O={v:?} ({kind})"),
        Name::SanDn(dn) => format!("SAN directoryName {} (empty subject)", describe_dn(dn)),
        Name::OwnedUri(v) => format!("URI {v}"),
        Name::OwnedEmail(v) => format!("email {v}"),
    };
    let kind = if case.excluded {
        "excluded"
    } else {
        "permitted"
    };
    format!("{kind} {base} | {name}")
}

fn verdict(accept: bool) -> &'static str {
    if accept {
        "accept"
    } else {
        "refuse"
    }
}

#[test]
fn every_name_form_is_decided_as_openssl_decides_it() {
    let mut setup = Setup::new();
    setup.rules = support::rules_accepting_any();
    // Each case has its own intermediate without a CRL, and openssl verify checks none:
    // this is about names, not revocation.
    setup.extra_server = "revocation = \"best-effort\"".into();
    let config = Config::load(&setup.write_config()).unwrap();
    let broker = Broker::build(config, Arc::new(Metrics::new())).unwrap();
    let root_pem = setup.write("nc-root.pem", &setup.root.pem);
    let now = rustls_pki_types::UnixTime::now();

    // A fixed corpus by default, so that CI decides the same cases every run;
    // `NAME_CONSTRAINTS_SEED=random` draws a new one (its seed printed) to look further.
    let seed = match std::env::var("NAME_CONSTRAINTS_SEED").ok().as_deref() {
        None => FIXED_SEED,
        Some("random") => fastrand::u64(..),
        Some(seed) => seed
            .parse::<u64>()
            .expect("NAME_CONSTRAINTS_SEED is a number or \"random\""),
    };
    let rerun = format!("NAME_CONSTRAINTS_SEED={seed} cargo test --test it name_constraints::");
    println!("generated cases: seed {seed} ({rerun})");
    let fixed = cases();
    let generated = generated_cases(seed);
    let mut table = vec![format!(
        "constraint | leaf name | expected | broker | openssl  (cases {}.. generated from seed {seed})",
        fixed.len()
    )];
    let mut disagree = false;
    for (i, case) in fixed.iter().chain(&generated).enumerate() {
        let ca = intermediate(&setup.root, &case.base, case.excluded);
        // A CN without a dot, which OpenSSL would otherwise check as a host name.
        let mut spec = LeafSpec::device(&format!("leaf{i}"));
        spec.spiffe = None;
        let leaf = ca.leaf_with(&spec, |p| leaf_names(&case.name, p));

        let broker_says = broker.authenticate(&leaf.chain(), now);
        let inter = setup.write(&format!("nc-inter-{i}.pem"), &ca.pem);
        let leaf_pem = setup.write(&format!("nc-leaf-{i}.pem"), &leaf.cert_pem);
        let openssl = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&root_pem)
            .arg("-untrusted")
            .arg(&inter)
            .args(["-purpose", "sslclient"])
            .arg(&leaf_pem)
            .output()
            .expect("openssl is needed for this test");
        let openssl_accepts = openssl.status.success();

        let broker_accepts = broker_says.is_ok();
        let openssl_expected = case.openssl.map_or(case.accept, |(answer, _)| answer);
        let ok = broker_accepts == case.accept && openssl_accepts == openssl_expected;
        disagree |= !ok;
        let broker_detail = match &broker_says {
            Ok(_) => String::new(),
            Err(refusal) => format!(" ({})", refusal.reason()),
        };
        let openssl_detail = match openssl_accepts {
            true => String::new(),
            false => {
                let out = String::from_utf8_lossy(&openssl.stdout).to_string()
                    + &String::from_utf8_lossy(&openssl.stderr);
                let reason = out
                    .lines()
                    .find(|l| l.contains("error "))
                    .and_then(|l| l.split(": ").last())
                    .unwrap_or("")
                    .to_owned();
                format!(" ({reason})")
            }
        };
        let laxer = match case.openssl {
            Some((answer, why)) => format!(" [OpenSSL known to {}: {why}]", verdict(answer)),
            None => String::new(),
        };
        table.push(format!(
            "{i}: {} | {} | {}{broker_detail} | {}{openssl_detail}{laxer}{}",
            describe(case),
            verdict(case.accept),
            verdict(broker_accepts),
            verdict(openssl_accepts),
            if ok { "" } else { "   <-- differs" }
        ));
    }
    println!("{}", table.join("\n"));
    assert!(
        !disagree,
        "verdicts differ (again with {rerun}):\n{}",
        table.join("\n")
    );
}
