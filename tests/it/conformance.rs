//! Validation conformance: a table of certificate chains beyond the matrix of
//! `chain_validation.rs`, each row with its expected outcome: accepted, or refused with the
//! stable reason (`Refusal::reason()`). Every row runs through `Broker::authenticate`, the
//! function the server calls for each /token request; the rows marked `tls` also go through
//! a real mutual-TLS /token request to a running broker (status and reason metric). A second
//! table holds trust configurations the broker must refuse to load. `docs/validation.md`
//! is this file as a policy table; keep them together.

use std::collections::BTreeMap;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, ExtendedKeyUsagePurpose, GeneralSubtree,
    IsCa, KeyUsagePurpose, NameConstraints,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use time::{Duration, OffsetDateTime};
use token_broker::broker::Broker;
use token_broker::config::Config;
use token_broker::metrics::Metrics;

use crate::support::{
    self, extension, raw_san, rules_accepting_any, tlv, uri_name_constraint, Ca, Leaf, LeafSpec,
    Setup,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Accept,
    /// Refused with this `Refusal::reason()`.
    Refuse(&'static str),
}
use Expect::{Accept, Refuse};

/// A trust configuration: the client CA bundle and the CRLs, as PEM.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Trust {
    bundle: Vec<String>,
    crls: Vec<String>,
    /// Extra `[server]` lines (pins).
    server: String,
}

struct Row {
    name: String,
    leaf: Leaf,
    /// `None`: the base trust (root `R` in the bundle, CRLs of `R` and of its intermediate).
    trust: Option<Trust>,
    expect: Expect,
    /// Also present the chain to a running broker over mutual TLS.
    tls: bool,
}

// ---------------------------------------------------------------------------------------
// DER and PEM helpers for what rcgen cannot express.

/// The elements (whole, with tag and length) of a DER element's contents.
fn children(der: &[u8]) -> Vec<Vec<u8>> {
    let (_, contents) = split(der);
    let mut rest = contents;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (header, body) = split(rest);
        let whole = header + body.len();
        out.push(rest[..whole].to_vec());
        rest = &rest[whole..];
    }
    out
}

/// (header length, contents) of the DER element at the start of `der`.
fn split(der: &[u8]) -> (usize, &[u8]) {
    let first = der[1] as usize;
    let (header, len) = if first < 0x80 {
        (2, first)
    } else {
        let count = first & 0x7f;
        let len = der[2..2 + count]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (2 + count, len)
    };
    (header, &der[header..header + len])
}

fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

fn cert_der(cert_pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .unwrap()
        .to_vec()
}

const SHA256_WITH_RSA: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b, 0x05, 0x00,
];
const ECDSA_WITH_SHA384: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];

/// A certificate with its signature algorithm replaced: in the signed part too (and then
/// signed again by `signer`, whose P-256 key hashes with SHA-256 whatever is declared), or
/// only in the outer field (the old signature kept).
fn with_signature_algorithm(cert_pem: &str, algorithm: &[u8], signer: Option<&Ca>) -> String {
    let der = cert_der(cert_pem);
    let parts = children(&der);
    let (mut tbs, signature) = (parts[0].clone(), parts[2].clone());
    if let Some(signer) = signer {
        let mut fields = children(&tbs);
        // [0] version, serialNumber, signature: the third field.
        assert_eq!(fields[0][0], 0xa0, "a v3 certificate");
        fields[2] = algorithm.to_vec();
        tbs = tlv(0x30, &fields.concat());
        let mut bits = vec![0];
        bits.extend(signer.sign(&tbs));
        let cert = tlv(0x30, &[tbs, algorithm.to_vec(), tlv(0x03, &bits)].concat());
        return pem("CERTIFICATE", &cert);
    }
    let cert = tlv(0x30, &[tbs, algorithm.to_vec(), signature].concat());
    pem("CERTIFICATE", &cert)
}

/// A certificate or CRL with the last byte of its signature changed.
fn tampered(pem_text: &str, label: &str) -> String {
    let mut der = match label {
        "CERTIFICATE" => cert_der(pem_text),
        _ => CertificateRevocationListDer::from_pem_slice(pem_text.as_bytes())
            .unwrap()
            .to_vec(),
    };
    let last = der.len() - 1;
    der[last] ^= 0x01;
    pem(label, &der)
}

/// The leaf with its certificate replaced (same key, same intermediates sent).
fn replace_leaf(leaf: &Leaf, cert_pem: String) -> Leaf {
    let rest = leaf.chain_pem.strip_prefix(&leaf.cert_pem).unwrap();
    Leaf {
        chain_pem: format!("{cert_pem}{rest}"),
        der: CertificateDer::from(cert_der(&cert_pem)),
        cert_pem,
        ..leaf.clone()
    }
}

/// The leaf sent with exactly these intermediates (PEM, in order).
fn sent_with(leaf: &Leaf, intermediates: &[&str]) -> Leaf {
    Leaf {
        chain_pem: format!("{}{}", leaf.cert_pem, intermediates.concat()),
        ..leaf.clone()
    }
}

/// A private extension the broker knows nothing of.
fn unknown_extension(critical: bool) -> CustomExtension {
    extension(&[1, 3, 6, 1, 4, 1, 55555, 1], critical, tlv(0x04, b"x"))
}

fn spec(name: &str, change: impl FnOnce(&mut LeafSpec)) -> LeafSpec {
    let mut s = LeafSpec::device(name);
    change(&mut s);
    s
}

fn dns_only(name: &str, dns: &str) -> LeafSpec {
    spec(name, |s| {
        s.spiffe = None;
        s.dns = vec![dns.into()];
    })
}

fn uri(text: &str) -> rcgen::SanType {
    rcgen::SanType::URI(text.to_owned().try_into().unwrap())
}

fn pathlen(n: u8) -> impl FnOnce(&mut CertificateParams) {
    move |p| p.is_ca = IsCa::Ca(BasicConstraints::Constrained(n))
}

/// A chain of `count` intermediates below `root`, the leaf below the last.
fn long_chain(root: &Ca, count: usize, name: &str) -> Leaf {
    let mut ca = root.intermediate(&format!("{name} 1"));
    for i in 2..=count {
        ca = ca.intermediate(&format!("{name} {i}"));
    }
    ca.leaf(&LeafSpec::device(name))
}

// ---------------------------------------------------------------------------------------
// The table.

fn table(base: &mut Setup) -> Vec<Row> {
    let root = &base.root;
    let int = &base.intermediate;
    let now = OffsetDateTime::now_utc();
    let mut rows = Vec::new();
    let mut row = |name: &str, leaf: Leaf, expect: Expect| {
        rows.push(Row {
            name: name.into(),
            leaf,
            trust: None,
            expect,
            tls: false,
        })
    };

    row(
        "baseline: leaf via an intermediate the client sends",
        int.leaf(&LeafSpec::device("baseline")),
        Accept,
    );

    // Path length.
    let zero = root.intermediate_with("Pathlen0 CA", pathlen(0));
    row(
        "pathlen:0 intermediate issues the leaf",
        zero.leaf(&LeafSpec::device("pathlen0-leaf")),
        Accept,
    );
    row(
        "pathlen:0 intermediate issues another intermediate",
        zero.intermediate("Below Pathlen0 CA")
            .leaf(&LeafSpec::device("pathlen0-deep")),
        Refuse("invalid_chain"),
    );
    let one = root.intermediate_with("Pathlen1 CA", pathlen(1));
    row(
        "pathlen:1 intermediate, one intermediate below it",
        one.intermediate("Below Pathlen1 CA")
            .leaf(&LeafSpec::device("pathlen1-ok")),
        Accept,
    );
    row(
        "pathlen:1 intermediate, two intermediates below it",
        one.intermediate("Below Pathlen1 CA a")
            .intermediate("Below Pathlen1 CA b")
            .leaf(&LeafSpec::device("pathlen1-deep")),
        Refuse("invalid_chain"),
    );

    // Name constraints on an intermediate.
    let permitted = root.intermediate_with("Gateways Only CA", |p| {
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName("gateways.test.example".into())],
            excluded_subtrees: vec![],
        })
    });
    row(
        "DNS permitted subtree: DNS SAN inside",
        permitted.leaf(&dns_only("nc-in", "gw-1.gateways.test.example")),
        Accept,
    );
    row(
        "DNS permitted subtree: DNS SAN outside",
        permitted.leaf(&dns_only("nc-out", "gw-1.elsewhere.example")),
        Refuse("invalid_chain"),
    );
    row(
        "DNS permitted subtree: SPIFFE ID only (DNS constraints do not constrain URIs)",
        permitted.leaf(&LeafSpec::device("nc-spiffe")),
        Accept,
    );
    let excluded = root.intermediate_with("No Lab CA", |p| {
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![],
            excluded_subtrees: vec![GeneralSubtree::DnsName("lab.test.example".into())],
        })
    });
    row(
        "DNS excluded subtree: DNS SAN inside",
        excluded.leaf(&dns_only("nc-ex-in", "x.lab.test.example")),
        Refuse("invalid_chain"),
    );
    row(
        "DNS excluded subtree: DNS SAN outside",
        excluded.leaf(&dns_only("nc-ex-out", "x.gateways.test.example")),
        Accept,
    );
    let uri_permitted = root.intermediate_with("SPIFFE Domain CA", |p| {
        p.custom_extensions
            .push(uri_name_constraint(support::TRUST_DOMAIN, false))
    });
    row(
        "URI permitted subtree (the trust domain): SPIFFE ID inside",
        uri_permitted.leaf(&LeafSpec::device("nc-uri-in")),
        Accept,
    );
    row(
        "URI permitted subtree (the trust domain): SPIFFE ID of another trust domain",
        uri_permitted.leaf(&spec("nc-uri-out", |s| {
            s.spiffe = Some("spiffe://other.example/device/nc-uri-out".into())
        })),
        Refuse("invalid_chain"),
    );
    let uri_excluded = root.intermediate_with("Not Evil CA", |p| {
        p.custom_extensions
            .push(uri_name_constraint("evil.example", true))
    });
    row(
        "URI excluded subtree: SPIFFE ID outside it",
        uri_excluded.leaf(&LeafSpec::device("nc-uri-ex")),
        Accept,
    );
    row(
        "URI excluded subtree: SPIFFE ID inside it",
        uri_excluded.leaf(&spec("nc-uri-ex-in", |s| {
            s.spiffe = Some("spiffe://evil.example/device/nc-uri-ex-in".into())
        })),
        Refuse("invalid_chain"),
    );
    let email_permitted = root.intermediate_with("Mail Domain CA", |p| {
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::Rfc822Name("test.example".into())],
            excluded_subtrees: vec![],
        })
    });
    let email = |name: &str, address: &str| {
        let address = address.to_owned();
        email_permitted.leaf_with(&LeafSpec::device(name), move |p| {
            p.subject_alt_names
                .push(rcgen::SanType::Rfc822Name(address.try_into().unwrap()))
        })
    };
    row(
        "rfc822Name permitted subtree: email SAN inside",
        email("nc-mail-in", "device@test.example"),
        Accept,
    );
    row(
        "rfc822Name permitted subtree: email SAN outside",
        email("nc-mail-out", "device@elsewhere.example"),
        Refuse("invalid_chain"),
    );
    let acme = |o: &str| {
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::OrganizationName, o);
        dn
    };
    let dir_permitted = root.intermediate_with("Acme Only CA", |p| {
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DirectoryName(acme("Acme"))],
            excluded_subtrees: vec![],
        })
    });
    let in_org = |name: &str, o: &str| {
        let mut dn = acme(o);
        dn.push(rcgen::DnType::CommonName, name);
        dir_permitted.leaf_with(&LeafSpec::device(name), move |p| p.distinguished_name = dn)
    };
    row(
        "directoryName permitted subtree (O=Acme): subject O=Acme, CN=...",
        in_org("nc-dir-in", "Acme"),
        Accept,
    );
    row(
        "directoryName permitted subtree (O=Acme): subject O=Other, CN=...",
        in_org("nc-dir-out", "Other"),
        Refuse("invalid_chain"),
    );
    let dir_excluded = root.intermediate_with("Not Evil Org CA", |p| {
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![],
            excluded_subtrees: vec![GeneralSubtree::DirectoryName(acme("Evil"))],
        })
    });
    row(
        "directoryName excluded subtree (O=Evil, a UTF8String): subject O=Evil as a TeletexString",
        dir_excluded.leaf_with(&LeafSpec::device("nc-dir-t61"), |p| {
            let mut dn = rcgen::DistinguishedName::new();
            dn.push(
                rcgen::DnType::OrganizationName,
                rcgen::DnValue::TeletexString("Evil".try_into().unwrap()),
            );
            dn.push(rcgen::DnType::CommonName, "nc-dir-t61");
            p.distinguished_name = dn;
        }),
        Refuse("invalid_chain"),
    );
    row(
        "URI excluded subtree: a URI SAN whose host is an IP address",
        uri_excluded.leaf_with(&LeafSpec::device("nc-uri-ip"), |p| {
            p.subject_alt_names.push(uri("https://192.0.2.1/x"))
        }),
        Refuse("invalid_chain"),
    );

    // Critical and unknown extensions.
    row(
        "leaf with an unknown critical extension",
        int.leaf_with(&LeafSpec::device("crit-leaf"), |p| {
            p.custom_extensions.push(unknown_extension(true))
        }),
        Refuse("invalid_chain"),
    );
    row(
        "intermediate with an unknown critical extension",
        root.intermediate_with("Critical Ext CA", |p| {
            p.custom_extensions.push(unknown_extension(true))
        })
        .leaf(&LeafSpec::device("crit-int")),
        Refuse("invalid_chain"),
    );
    row(
        "leaf with an unknown non-critical extension",
        int.leaf_with(&LeafSpec::device("noncrit-leaf"), |p| {
            p.custom_extensions.push(unknown_extension(false))
        }),
        Accept,
    );
    row(
        "intermediate with an unknown non-critical extension",
        root.intermediate_with("Noncritical Ext CA", |p| {
            p.custom_extensions.push(unknown_extension(false))
        })
        .leaf(&LeafSpec::device("noncrit-int")),
        Accept,
    );

    // EKU of intermediates.
    let with_eku = |name: &str, ekus: Vec<ExtendedKeyUsagePurpose>| {
        root.intermediate_with(name, |p| p.extended_key_usages = ekus)
    };
    row(
        "intermediate with EKU serverAuth only, clientAuth leaf",
        with_eku("Server Only CA", vec![ExtendedKeyUsagePurpose::ServerAuth])
            .leaf(&LeafSpec::device("eku-server-int")),
        Refuse("bad_eku"),
    );
    row(
        "intermediate with EKU clientAuth",
        with_eku("Client CA", vec![ExtendedKeyUsagePurpose::ClientAuth])
            .leaf(&LeafSpec::device("eku-client-int")),
        Accept,
    );
    row(
        "intermediate with EKU serverAuth and clientAuth",
        with_eku(
            "Both EKU CA",
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
        .leaf(&LeafSpec::device("eku-both-int")),
        Accept,
    );
    row(
        "intermediate without EKU",
        int.leaf(&LeafSpec::device("eku-none-int")),
        Accept,
    );
    row(
        "intermediate with anyExtendedKeyUsage only (webpki wants clientAuth itself)",
        with_eku("Any EKU CA", vec![ExtendedKeyUsagePurpose::Any])
            .leaf(&LeafSpec::device("eku-any-int")),
        Refuse("bad_eku"),
    );

    // SANs.
    let spiffe = |path: &str| format!("spiffe://{}/device/{path}", support::TRUST_DOMAIN);
    row(
        "the same SPIFFE ID twice",
        int.leaf_with(&LeafSpec::device("twice"), |p| {
            p.subject_alt_names.push(uri(&spiffe("twice")))
        }),
        Refuse("malformed_certificate"),
    );
    row(
        "two different SPIFFE IDs",
        int.leaf_with(&LeafSpec::device("first"), |p| {
            p.subject_alt_names.push(uri(&spiffe("second")))
        }),
        Refuse("malformed_certificate"),
    );
    row(
        "SPIFFE ID and a non-SPIFFE URI SAN",
        int.leaf_with(&LeafSpec::device("with-https"), |p| {
            p.subject_alt_names
                .push(uri("https://devices.test.example/x"))
        }),
        Accept,
    );
    row(
        "URI SAN that is not a URI",
        int.leaf(&spec("not-uri", |s| s.spiffe = Some("not a uri".into()))),
        Refuse("malformed_certificate"),
    );
    row(
        "DNS SAN with invalid characters",
        int.leaf(&dns_only("bad-dns", "gw_1!.gateways.test.example")),
        Refuse("malformed_certificate"),
    );
    row(
        "empty subjectAltName extension",
        int.leaf_with(&spec("empty-san", |s| s.spiffe = None), |p| {
            p.custom_extensions.push(raw_san(&[]))
        }),
        Refuse("malformed_certificate"),
    );
    row(
        "IP SAN of 5 bytes",
        int.leaf_with(&spec("ip5", |s| s.spiffe = None), |p| {
            p.custom_extensions.push(raw_san(&[
                tlv(0x86, spiffe("ip5").as_bytes()),
                tlv(0x87, &[10, 0, 0, 1, 9]),
            ]))
        }),
        Refuse("malformed_certificate"),
    );

    // Long chains: webpki builds at most 6 intermediates; the broker takes at most 10
    // certificates from a client.
    row("6 intermediates", long_chain(root, 6, "six"), Accept);
    row(
        "7 intermediates",
        long_chain(root, 7, "seven"),
        Refuse("invalid_chain"),
    );
    row(
        "8 intermediates",
        long_chain(root, 8, "eight"),
        Refuse("invalid_chain"),
    );
    row(
        "20 intermediates",
        long_chain(root, 20, "twenty"),
        Refuse("invalid_chain"),
    );
    // Path building tries every same-named candidate at every level: nine self-issued
    // CAs of one name would cost webpki's whole budget (a third of a CPU second).
    let loops: Vec<Ca> = (0..9).map(|_| Ca::root("Loop CA")).collect();
    let pems: Vec<&str> = loops.iter().map(|c| c.pem.as_str()).collect();
    row(
        "9 sent CAs sharing one name, none trusted (path-building fan-out)",
        sent_with(&loops[0].leaf(&LeafSpec::device("loop")), &pems),
        Refuse("invalid_chain"),
    );
    row(
        "3 sent CAs sharing one name, none trusted",
        sent_with(&loops[0].leaf(&LeafSpec::device("loop3")), &pems[..3]),
        Refuse("unknown_issuer"),
    );
    // Three names in a cycle (subject N0 issued by N1, N1 by N2, N2 by N0), three
    // certificates each: the most fan-out the limits allow.
    let names = ["Cycle 0", "Cycle 1", "Cycle 2"];
    let cycle: Vec<String> = (0..9)
        .map(|i| {
            Ca::root(names[(i / 3 + 1) % 3])
                .intermediate(names[i / 3])
                .pem
        })
        .collect();
    let cycle: Vec<&str> = cycle.iter().map(String::as_str).collect();
    row(
        "9 sent CAs, three names in an issuer cycle, none trusted",
        sent_with(
            &Ca::root("Cycle 1")
                .intermediate("Cycle 0")
                .leaf(&LeafSpec::device("cycle")),
            &cycle,
        ),
        Refuse("invalid_chain"),
    );

    // Huge certificates.
    row(
        "leaf with a 100 KB extension",
        int.leaf_with(&LeafSpec::device("huge-ext"), |p| {
            p.custom_extensions.push(extension(
                &[1, 3, 6, 1, 4, 1, 55555, 2],
                false,
                tlv(0x04, &vec![0x41; 100_000]),
            ))
        }),
        Refuse("malformed_certificate"),
    );
    row(
        "intermediate with a 100 KB extension",
        root.intermediate_with("Huge CA", |p| {
            p.custom_extensions.push(extension(
                &[1, 3, 6, 1, 4, 1, 55555, 2],
                false,
                tlv(0x04, &vec![0x41; 100_000]),
            ))
        })
        .leaf(&LeafSpec::device("huge-int")),
        Refuse("malformed_certificate"),
    );
    row(
        "leaf with 2,000 DNS SANs",
        int.leaf(&spec("many-sans", |s| {
            s.dns = (0..2000).map(|i| format!("d{i}.test.example")).collect()
        })),
        Accept,
    );

    // Signature algorithms that do not fit the signature.
    let plain = int.leaf(&LeafSpec::device("sig"));
    row(
        "outer signatureAlgorithm says RSA, the signed one ECDSA",
        replace_leaf(
            &plain,
            with_signature_algorithm(&plain.cert_pem, SHA256_WITH_RSA, None),
        ),
        Refuse("bad_signature"),
    );
    row(
        "declared sha256WithRSAEncryption, signed by the ECDSA intermediate",
        replace_leaf(
            &plain,
            with_signature_algorithm(&plain.cert_pem, SHA256_WITH_RSA, Some(int)),
        ),
        Refuse("bad_signature"),
    );
    row(
        "declared ecdsa-with-SHA384 over a P-256 signature of a SHA-256 hash",
        replace_leaf(
            &plain,
            with_signature_algorithm(&plain.cert_pem, ECDSA_WITH_SHA384, Some(int)),
        ),
        Refuse("bad_signature"),
    );
    let sig_int = root.intermediate("Sig Check CA");
    let below = sig_int.leaf(&LeafSpec::device("sig-int"));
    row(
        "intermediate declaring ecdsa-with-SHA384 over a SHA-256 signature",
        sent_with(
            &below,
            &[&with_signature_algorithm(
                &sig_int.pem,
                ECDSA_WITH_SHA384,
                Some(root),
            )],
        ),
        Refuse("bad_signature"),
    );
    row(
        "leaf with a tampered signature",
        replace_leaf(&plain, tampered(&plain.cert_pem, "CERTIFICATE")),
        Refuse("bad_signature"),
    );

    // Issuers that may not issue.
    let device_issuer = int.intermediate_with("device-as-issuer", |p| {
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    });
    row(
        "leaf issued by a device certificate (basicConstraints CA:FALSE)",
        device_issuer.leaf(&LeafSpec::device("child-of-device")),
        Refuse("invalid_chain"),
    );
    row(
        "leaf issued by a certificate without basicConstraints",
        root.intermediate_with("No Basic Constraints", |p| p.is_ca = IsCa::NoCa)
            .leaf(&LeafSpec::device("child-of-no-bc")),
        Refuse("invalid_chain"),
    );
    let no_sign = root.intermediate_with("No CertSign CA", |p| {
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign]
    });
    let no_sign_leaf = no_sign.leaf(&LeafSpec::device("child-of-no-certsign"));
    row(
        "leaf issued by a CA:TRUE certificate whose keyUsage lacks keyCertSign",
        no_sign_leaf.clone(),
        Refuse("invalid_chain"),
    );
    let may_sign = no_sign.issued_by(root, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
    });
    row(
        "same, with a copy of that CA allowing keyCertSign sent after it (path building moves on)",
        sent_with(&no_sign_leaf, &[&no_sign.pem, &may_sign]),
        Accept,
    );

    // Revocation with the base CRLs.
    let revoked = int.leaf(&LeafSpec::device("revoked"));
    base.revoked.push(revoked.serial);
    row(
        "leaf listed in its issuer's CRL",
        revoked,
        Refuse("revoked"),
    );
    let revoked_int = root.intermediate("Revoked Issuing CA");
    base.revoked.push(revoked_int.serial);
    row(
        "intermediate listed in the root's CRL",
        revoked_int.leaf(&LeafSpec::device("child-of-revoked")),
        Refuse("revoked"),
    );
    row(
        "issuer without a configured CRL, best-effort (status unknown is allowed)",
        zero.leaf(&LeafSpec::device("no-crl")),
        Accept,
    );

    // These also go over mutual TLS: one of each kind of outcome. (Leaves that webpki
    // cannot parse, such as one with an unknown critical extension, cannot: rustls refuses
    // to present them, and the server's handshake refuses them too, with the same reason:
    // `a_leaf_the_handshake_cannot_parse_is_refused_with_its_reason`.)
    for name in [
        "baseline: leaf via an intermediate the client sends",
        "pathlen:0 intermediate issues another intermediate",
        "DNS permitted subtree: DNS SAN outside",
        "URI permitted subtree (the trust domain): SPIFFE ID inside",
        "URI permitted subtree (the trust domain): SPIFFE ID of another trust domain",
        "intermediate with an unknown critical extension",
        "intermediate with EKU serverAuth only, clientAuth leaf",
        "declared ecdsa-with-SHA384 over a P-256 signature of a SHA-256 hash",
        "leaf issued by a device certificate (basicConstraints CA:FALSE)",
        "leaf issued by a CA:TRUE certificate whose keyUsage lacks keyCertSign",
        "20 intermediates",
        "9 sent CAs sharing one name, none trusted (path-building fan-out)",
        "intermediate listed in the root's CRL",
        "URI SAN that is not a URI",
    ] {
        let row = rows.iter_mut().find(|r| r.name == name);
        row.unwrap_or_else(|| panic!("no row {name:?}")).tls = true;
    }

    rows.extend(own_trust_rows(now));
    rows
}

/// Rows that need their own bundle or CRLs.
fn own_trust_rows(now: OffsetDateTime) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut row = |name: &str, leaf: Leaf, trust: &Trust, expect: Expect, tls: bool| {
        rows.push(Row {
            name: name.into(),
            leaf,
            trust: Some(trust.clone()),
            expect,
            tls,
        })
    };

    // Cross-signed roots: intermediate I issued by root A and again by root B.
    let a = Ca::root("Cross Root A");
    let b = Ca::root("Cross Root B");
    let i = a.intermediate("Cross Issuing CA");
    let i_by_b = i.issued_by(&b, |_| {});
    let leaf = sent_with(&i.leaf(&LeafSpec::device("cross")), &[&i.pem, &i_by_b]);
    let only = |cas: &[&Ca]| Trust {
        bundle: cas.iter().map(|c| c.pem.clone()).collect(),
        ..Trust::default()
    };
    row(
        "cross-signed intermediate, bundle holds root A only",
        leaf.clone(),
        &only(&[&a]),
        Accept,
        true,
    );
    row(
        "cross-signed intermediate, bundle holds root B only",
        leaf.clone(),
        &only(&[&b]),
        Accept,
        false,
    );
    row(
        "cross-signed intermediate, bundle holds neither root",
        leaf.clone(),
        &only(&[&Ca::root("Unrelated Root")]),
        Refuse("unknown_issuer"),
        false,
    );
    // Old root A's cross-sign of I has expired; new root B's is valid.
    let expired_by_a = i.issued_by(&a, |p| {
        p.not_before = now - Duration::days(30);
        p.not_after = now - Duration::days(1);
    });
    let via_expired_first = sent_with(
        &i.leaf(&LeafSpec::device("cross-expired")),
        &[&expired_by_a, &i_by_b],
    );
    row(
        "expired cross-sign by old root A sent first, valid one by new root B next, both roots trusted",
        via_expired_first.clone(),
        &only(&[&a, &b]),
        Accept,
        false,
    );
    row(
        "expired cross-sign by old root A, only root A trusted",
        via_expired_first,
        &only(&[&a]),
        Refuse("expired"),
        false,
    );

    // A name-constrained root.
    let constrained_root = Ca::root_with("Constrained Root", |p| {
        p.name_constraints = Some(NameConstraints {
            permitted_subtrees: vec![GeneralSubtree::DnsName("gateways.test.example".into())],
            excluded_subtrees: vec![],
        })
    });
    let trust = only(&[&constrained_root]);
    row(
        "root with a DNS permitted subtree: DNS SAN inside",
        constrained_root.leaf(&dns_only("root-nc-in", "gw-2.gateways.test.example")),
        &trust,
        Accept,
        false,
    );
    row(
        "root with a DNS permitted subtree: DNS SAN outside",
        constrained_root.leaf(&dns_only("root-nc-out", "gw-2.elsewhere.example")),
        &trust,
        Refuse("invalid_chain"),
        false,
    );
    // A root's extensions are not processed (it is trusted as configured): webpki reads
    // anchors ignoring unknown critical extensions.
    let critical_root = Ca::root_with("Critical Ext Root", |p| {
        p.custom_extensions.push(unknown_extension(true))
    });
    row(
        "root with an unknown critical extension",
        critical_root.leaf(&LeafSpec::device("crit-root")),
        &only(&[&critical_root]),
        Accept,
        false,
    );

    // CRL policy. Root R is in the bundle; its intermediates are sent by clients, so their
    // CRLs can only be checked against them per request.
    let r = Ca::root("CRL Policy Root");
    let stale = r.intermediate("Stale CRL CA");
    let wrong = r.intermediate("Wrong Key CRL CA");
    let corrupt = r.intermediate("Corrupt CRL CA");
    let free = r.intermediate("Unrelated CRL CA");
    let impostor = Ca::root("Wrong Key CRL CA");
    // Two intermediates with one name and two keys; the CRL is the first one's. The broker
    // remembers a CRL's signature check per issuer key, so each is asked more than once.
    let twin = r.intermediate("Twin CRL CA");
    let twin_by_other_key = r.intermediate("Twin CRL CA");
    let twin_revoked = twin.leaf(&LeafSpec::device("twin-revoked"));
    // rcgen signs no CRL with a CA lacking cRLSign, so the CA sends a copy of its
    // certificate (same name and key) whose keyUsage lacks it.
    let no_crl_sign = r.intermediate("No cRLSign CA");
    let without_crl_sign = no_crl_sign.issued_by(&r, |p| {
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ]
    });
    let trust = Trust {
        bundle: vec![r.pem.clone()],
        crls: vec![
            r.crl(&[]),
            stale.crl_from(&[], now - Duration::days(8)),
            impostor.crl(&[]),
            tampered(&corrupt.crl(&[]), "X509 CRL"),
            Ca::root("Stranger CRL Root").crl(&[free.serial]),
            twin.crl(&[twin_revoked.serial]),
            no_crl_sign.crl(&[]),
        ],
        server: String::new(),
    };
    for (n, (name, ca, expect)) in [
        (
            "twin CA whose key did not sign the CRL",
            &twin_by_other_key,
            Refuse("invalid_chain"),
        ),
        ("twin CA whose key signed the CRL", &twin, Accept),
        (
            "twin CA whose key did not sign the CRL, again",
            &twin_by_other_key,
            Refuse("invalid_chain"),
        ),
        ("twin CA whose key signed the CRL, again", &twin, Accept),
    ]
    .into_iter()
    .enumerate()
    {
        row(
            name,
            ca.leaf(&LeafSpec::device(&format!("twin-{n}"))),
            &trust,
            expect,
            false,
        );
    }
    row(
        "leaf listed in the CRL of the twin CA whose key signed it",
        twin_revoked,
        &trust,
        Refuse("revoked"),
        false,
    );
    row(
        "CRL of a sent intermediate whose keyUsage lacks cRLSign",
        sent_with(
            &no_crl_sign.leaf(&LeafSpec::device("no-crl-sign")),
            &[&without_crl_sign],
        ),
        &trust,
        Refuse("invalid_chain"),
        false,
    );
    row(
        "CRL of the issuer expired",
        stale.leaf(&LeafSpec::device("stale-crl")),
        &trust,
        Refuse("crl_expired"),
        true,
    );
    row(
        "leaf directly under the root, whose CRL is current",
        r.leaf(&LeafSpec::device("current-crl")),
        &trust,
        Accept,
        false,
    );
    row(
        "CRL naming a sent intermediate, signed by another key",
        wrong.leaf(&LeafSpec::device("wrong-crl")),
        &trust,
        Refuse("invalid_chain"),
        false,
    );
    row(
        "CRL of a sent intermediate with a bad signature",
        corrupt.leaf(&LeafSpec::device("corrupt-crl")),
        &trust,
        Refuse("invalid_chain"),
        false,
    );
    row(
        "CRL of an unrelated CA listing the intermediate's serial: not revoked, but its issuer has no CRL",
        free.leaf(&LeafSpec::device("unrelated-crl")),
        &trust,
        Refuse("crl_missing"),
        false,
    );

    // Partitioned CRLs (with an issuingDistributionPoint): webpki's scope rules decide.
    let p = Ca::root("Partitioned CRL Root");
    let q = p.intermediate("Partitioned CRL CA");
    let listed = q.leaf(&LeafSpec::device("partitioned-listed"));
    let idp = partitioned;
    let partitioned = Trust {
        bundle: vec![p.pem.clone()],
        crls: vec![
            q.crl_partitioned(&[listed.serial], idp(rcgen::CrlScope::UserCertsOnly)),
            p.crl_partitioned(&[q.serial], idp(rcgen::CrlScope::UserCertsOnly)),
        ],
        server: "revocation = \"best-effort\"".into(),
    };
    row(
        "leaf listed in its issuer's user-certificates CRL",
        listed,
        &partitioned,
        Refuse("revoked"),
        true,
    );
    row(
        "intermediate listed in a user-certificates-only CRL (out of its scope), best-effort",
        q.leaf(&LeafSpec::device("partitioned-free")),
        &partitioned,
        Accept,
        false,
    );
    row(
        "same, require: no CRL covers the intermediate",
        q.leaf(&LeafSpec::device("partitioned-require")),
        &Trust {
            server: "revocation = \"require\"".into(),
            ..partitioned.clone()
        },
        Refuse("crl_missing"),
        false,
    );

    // Pinned roots.
    let pinned = Ca::root("Pinned Root");
    let pinned_trust = Trust {
        bundle: vec![
            pinned.pem.clone(),
            pinned.intermediate("Unpinned Issuing CA").pem,
        ],
        crls: vec![],
        server: format!("client_ca_pins = [\"{}\"]", openssl_pin(&pinned.pem)),
    };
    row(
        "root matching client_ca_pins (intermediates need no pin)",
        pinned.leaf(&LeafSpec::device("pinned")),
        &pinned_trust,
        Accept,
        true,
    );

    // A big CRL (the broker keeps its serials in a table of its own, grouped by length):
    // serials of every encoded length from 1 to 9 bytes (the bigger groups indexed), the leaf's among them or not.
    let big_root = Ca::root("Big CRL Root");
    let listed = big_root.leaf(&LeafSpec::device("big-crl-listed"));
    let absent = big_root.leaf(&LeafSpec::device("big-crl-absent"));
    let mut serials: Vec<u64> = (0..50_000u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (i % 64))
        .filter(|serial| *serial != absent.serial)
        .collect();
    serials.push(listed.serial);
    let big = crl_trust(&big_root, big_root.crl(&serials));
    row(
        "leaf listed in a CRL of 50,000 entries",
        listed,
        &big,
        Refuse("revoked"),
        false,
    );
    row(
        "leaf absent from a CRL of 50,000 entries",
        absent,
        &big,
        Accept,
        false,
    );

    // Revocation policy: under `require` every CA that issued a certificate of the path
    // must have a CRL; `require` is the default whenever CRLs are configured.
    let policy_root = Ca::root("Policy Root");
    let covered = policy_root.intermediate("Policy Issuing CA");
    let uncovered = policy_root.intermediate("Policy Issuing CA Without CRL");
    let revoked_uncovered = policy_root.intermediate("Revoked Policy Issuing CA Without CRL");
    let policy = |line: &str, crls: &[String]| Trust {
        bundle: vec![policy_root.pem.clone()],
        crls: crls.to_vec(),
        server: line.into(),
    };
    let both = [
        policy_root.crl(&[revoked_uncovered.serial]),
        covered.crl(&[]),
    ];
    let require = policy("revocation = \"require\"", &both);
    row(
        "require: every CA of the path has a CRL",
        covered.leaf(&LeafSpec::device("policy-covered")),
        &require,
        Accept,
        false,
    );
    row(
        "require: the issuing CA has no CRL",
        uncovered.leaf(&LeafSpec::device("policy-uncovered")),
        &require,
        Refuse("crl_missing"),
        true,
    );
    row(
        "require: the root has no CRL",
        covered.leaf(&LeafSpec::device("policy-no-root-crl")),
        &policy("revocation = \"require\"", &both[1..]),
        Refuse("crl_missing"),
        false,
    );
    row(
        "require: the issuing CA has no CRL and the root's CRL revokes it",
        revoked_uncovered.leaf(&LeafSpec::device("policy-revoked")),
        &require,
        Refuse("revoked"),
        false,
    );
    row(
        "best-effort: the issuing CA has no CRL",
        uncovered.leaf(&LeafSpec::device("policy-best-effort")),
        &policy("revocation = \"best-effort\"", &both),
        Accept,
        false,
    );

    // A root is trusted only within its validity (webpki ignores an anchor's dates).
    let expired_root = Ca::root_with("Expired Root", |p| {
        p.not_before = now - Duration::days(30);
        p.not_after = now - Duration::days(1);
    });
    row(
        "expired root",
        expired_root.leaf(&LeafSpec::device("under-expired-root")),
        &only(&[&expired_root]),
        Refuse("expired"),
        true,
    );
    let future_root = Ca::root_with("Future Root", |p| {
        p.not_before = now + Duration::days(1);
        p.not_after = now + Duration::days(30);
    });
    row(
        "root not yet valid",
        future_root.leaf(&LeafSpec::device("under-future-root")),
        &only(&[&future_root]),
        Refuse("not_yet_valid"),
        false,
    );
    // A cross-signed intermediate under an expired and a valid root: path building moves on.
    let old = Ca::root_with("Expired Cross Root", |p| {
        p.not_before = now - Duration::days(30);
        p.not_after = now - Duration::days(1);
    });
    let new = Ca::root("Current Cross Root");
    let cross = old.intermediate("Cross Issuing CA Under Expired Root");
    let cross_by_new = cross.issued_by(&new, |_| {});
    row(
        "intermediate cross-signed by an expired root and a valid one, both trusted",
        sent_with(
            &cross.leaf(&LeafSpec::device("cross-expired-root")),
            &[&cross.pem, &cross_by_new],
        ),
        &only(&[&old, &new]),
        Accept,
        false,
    );
    rows
}

/// An issuingDistributionPoint of a partitioned CRL.
fn partitioned(scope: rcgen::CrlScope) -> rcgen::CrlIssuingDistributionPoint {
    rcgen::CrlIssuingDistributionPoint {
        distribution_point: rcgen::CrlDistributionPoint {
            uris: vec!["http://crl.test.example/partitioned.crl".into()],
        },
        scope: Some(scope),
    }
}

/// The pin of a PEM certificate as the documented openssl command computes it.
fn openssl_pin(cert_pem: &str) -> String {
    support::require_tool("openssl", "openssl");
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert_pem).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -in \"$1\" -pubkey -noout | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | base64",
        )
        .arg("sh")
        .arg(&ca)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("sha256/{}", String::from_utf8(out.stdout).unwrap().trim())
}

// ---------------------------------------------------------------------------------------
// Running the table.

/// A Setup for `trust` (`None`: the base Setup's own root and CRLs).
fn setup_for(trust: Option<&Trust>) -> Setup {
    let mut setup = Setup::new();
    setup.rules = rules_accepting_any();
    // The base trust has CRLs for its root and intermediate only; the table's other CAs
    // test path validation, not revocation policy (own rows do). The policy is said
    // outright, so that the CRL the webpki variant adds does not change it.
    let best_effort = "revocation = \"best-effort\"\n";
    setup.extra_server = best_effort.into();
    if let Some(trust) = trust {
        setup.client_ca_pem = Some(trust.bundle.concat());
        setup.crl_pems = Some(trust.crls.clone());
        setup.extra_server = format!("{}\n", trust.server);
        if !trust.server.contains("revocation") {
            setup.extra_server += if trust.crls.is_empty() {
                best_effort
            } else {
                "revocation = \"require\"\n"
            };
        }
    }
    setup
}

fn build(setup: &Setup) -> Result<Broker, String> {
    let config = Config::load(&setup.write_config()).map_err(|e| e.to_string())?;
    Broker::build(config, Arc::new(Metrics::new())).map_err(|p| p.to_string())
}

fn outcome(broker: &Broker, leaf: &Leaf) -> (Expect, String) {
    let now = rustls_pki_types::UnixTime::now();
    match broker.authenticate(&leaf.chain(), now) {
        Ok(auth) => (Accept, format!("accepted, rule {}", auth.rule.name)),
        Err(refusal) => (Refuse(refusal.reason()), refusal.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn conformance_table() {
    let mut base = setup_for(None);
    let rows = table(&mut base);

    // One broker per trust configuration, built from files like the server's.
    let mut setups: BTreeMap<Option<Trust>, Setup> = BTreeMap::new();
    for row in &rows {
        if let Some(trust) = &row.trust {
            setups
                .entry(Some(trust.clone()))
                .or_insert_with(|| setup_for(Some(trust)));
        }
    }
    setups.insert(None, base);
    let brokers: BTreeMap<Option<Trust>, Broker> = setups
        .iter()
        .map(|(trust, setup)| (trust.clone(), build(setup).unwrap()))
        .collect();
    // The broker checks revocation itself unless a CRL is partitioned; then webpki does.
    // An unrelated partitioned CRL switches to webpki's check without changing what is
    // revoked: both must decide every row alike, in the same words.
    let unrelated_partitioned = Ca::root("Unrelated Partitioned CRL Root")
        .crl_partitioned(&[], partitioned(rcgen::CrlScope::UserCertsOnly));
    let webpki_brokers: BTreeMap<Option<Trust>, Broker> = setups
        .iter_mut()
        .map(|(trust, setup)| {
            setup.extra_crl_pems = vec![unrelated_partitioned.clone()];
            let broker = build(setup).unwrap();
            setup.extra_crl_pems.clear();
            (trust.clone(), broker)
        })
        .collect();

    let mut failures = Vec::new();
    let mut report = Vec::new();
    for row in &rows {
        let (got, description) = outcome(&brokers[&row.trust], &row.leaf);
        let by_webpki = outcome(&webpki_brokers[&row.trust], &row.leaf);
        if by_webpki != (got, description.clone()) {
            failures.push(format!(
                "{}: the broker's revocation check says {got:?} ({description}), webpki's {by_webpki:?}",
                row.name
            ));
        }
        report.push(format!("{:?} | {} | {description}", got, row.name));
        if got != row.expect {
            failures.push(format!(
                "{}: expected {:?}, got {got:?} ({description})",
                row.name, row.expect
            ));
        }
        // A refusal is said in words, not as a webpki error name.
        if description.contains("Error") || description.contains("Context") {
            failures.push(format!("{}: unclear description {description:?}", row.name));
        }
    }
    println!("{}", report.join("\n"));

    // The rows marked `tls`, over mutual TLS to a running broker, per trust configuration.
    for (trust, setup) in setups {
        let tls_rows: Vec<&Row> = rows.iter().filter(|r| r.tls && r.trust == trust).collect();
        if tls_rows.is_empty() {
            continue;
        }
        let broker = setup.start().await;
        for row in tls_rows {
            if let Err(e) = over_tls(&broker, row).await {
                failures.push(format!("{} (over TLS): {e}", row.name));
            }
        }
        broker.stop().await;
    }
    assert!(
        failures.is_empty(),
        "conformance failures:\n{}",
        failures.join("\n")
    );
}

async fn over_tls(broker: &support::TestBroker, row: &Row) -> Result<(), String> {
    let sample =
        |reason: &str| format!("token_broker_client_cert_rejections_total{{reason=\"{reason}\"}}");
    let before = match row.expect {
        Refuse(reason) => broker.metric(&sample(reason)).await,
        Accept => 0.0,
    };
    let (status, body) = broker
        .token(Some(&row.leaf), "grant_type=client_credentials")
        .await;
    match row.expect {
        Accept if status == 200 => Ok(()),
        Refuse(reason) if status == 401 => {
            let after = broker
                .metric_eventually(&sample(reason), before + 1.0)
                .await;
            if after == before + 1.0 {
                Ok(())
            } else {
                Err(format!(
                    "401 {body}, but the {reason} count went {before} -> {after}"
                ))
            }
        }
        expect => Err(format!("expected {expect:?}, got {status} {body}")),
    }
}

// ---------------------------------------------------------------------------------------
// Trust configurations that must not load.

struct LoadCase {
    name: &'static str,
    trust: Trust,
    /// Phrases the problem report must contain.
    says: Vec<String>,
}

fn load_cases() -> Vec<LoadCase> {
    let root = Ca::root("Load Root");
    let ca_with = |name: &str, change: fn(&mut CertificateParams)| Ca::root_with(name, change);
    let same_name = Ca::root("Load Root");
    // rcgen signs no CRL for a CA without cRLSign: the CRL is made by the CA, the bundle
    // holds a self-issued copy of it (same name and key) whose keyUsage lacks cRLSign.
    let crl_signer = Ca::root("No CRLSign Root");
    let no_crl_sign = crl_signer.issued_by(&crl_signer, |p| {
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign]
    });
    let no_cert_sign = ca_with("No CertSign Root", |p| {
        p.key_usages = vec![KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature]
    });
    let server_root = ca_with("Server Only Root", |p| {
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]
    });
    let rogue = Ca::root("Rogue Root");
    let bundle = |cas: &[&str]| cas.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        LoadCase {
            name: "CRL naming a bundle root, signed by another key",
            trust: Trust {
                bundle: bundle(&[&root.pem]),
                crls: vec![same_name.crl(&[])],
                server: String::new(),
            },
            says: vec!["is not validly signed by the CA CN=Load Root".into()],
        },
        LoadCase {
            name: "CRL of a bundle root with a bad signature",
            trust: Trust {
                bundle: bundle(&[&root.pem]),
                crls: vec![tampered(&root.crl(&[]), "X509 CRL")],
                server: String::new(),
            },
            says: vec!["is not validly signed by the CA CN=Load Root".into()],
        },
        LoadCase {
            name: "CRL of a bundle root whose keyUsage lacks cRLSign",
            trust: Trust {
                bundle: bundle(&[&no_crl_sign]),
                crls: vec![crl_signer.crl(&[])],
                server: String::new(),
            },
            says: vec!["cRLSign".into()],
        },
        LoadCase {
            name: "bundle root whose keyUsage lacks keyCertSign",
            trust: Trust {
                bundle: bundle(&[&no_cert_sign.pem]),
                ..Trust::default()
            },
            says: vec!["CN=No CertSign Root has a keyUsage without keyCertSign".into()],
        },
        LoadCase {
            name: "bundle intermediate whose keyUsage lacks keyCertSign",
            trust: Trust {
                bundle: bundle(&[
                    &root.pem,
                    &root
                        .intermediate_with("No CertSign Intermediate", |p| {
                            p.key_usages = vec![KeyUsagePurpose::DigitalSignature]
                        })
                        .pem,
                ]),
                ..Trust::default()
            },
            says: vec!["CN=No CertSign Intermediate has a keyUsage without keyCertSign".into()],
        },
        LoadCase {
            name: "bundle root with EKU serverAuth only",
            trust: Trust {
                bundle: bundle(&[&server_root.pem]),
                ..Trust::default()
            },
            says: vec!["CN=Server Only Root has an extendedKeyUsage without clientAuth".into()],
        },
        LoadCase {
            name: "pins set, a root of the bundle not pinned",
            trust: Trust {
                bundle: bundle(&[&root.pem, &rogue.pem]),
                crls: vec![],
                server: format!("client_ca_pins = [\"{}\"]", openssl_pin(&root.pem)),
            },
            says: vec![
                "root CA not pinned by server.client_ca_pins: CN=Rogue Root".into(),
                // The pin to add, exactly as openssl computes it.
                format!("its pin: \"{}\"", openssl_pin(&rogue.pem)),
            ],
        },
        LoadCase {
            name: "malformed pin",
            trust: Trust {
                bundle: bundle(&[&root.pem]),
                crls: vec![],
                server: "client_ca_pins = [\"sha1/AAAA\"]".into(),
            },
            says: vec!["invalid pin \"sha1/AAAA\"".into(), "client_ca_pins".into()],
        },
        LoadCase {
            name: "revocation required without any CRL",
            trust: Trust {
                bundle: bundle(&[&root.pem]),
                crls: vec![],
                server: "revocation = \"require\"".into(),
            },
            says: vec!["neither server.crls nor server.crl_sources is configured".into()],
        },
        LoadCase {
            name: "CRL without a cRLNumber",
            trust: crl_trust(
                &root,
                crl_with_extensions(&root, &root.crl(&[]), |exts| {
                    exts.retain(|e| !e.windows(5).any(|w| w == CRL_NUMBER_OID))
                }),
            ),
            says: vec!["crl-0.pem: CRL of CN=Load Root has no cRLNumber".into()],
        },
        LoadCase {
            name: "CRL with a critical cRLNumber",
            trust: crl_trust(
                &root,
                crl_with_extensions(&root, &root.crl(&[]), |exts| {
                    for ext in exts.iter_mut() {
                        let parts = children(ext);
                        if parts[0] == CRL_NUMBER_OID {
                            let critical = tlv(0x01, &[0xff]);
                            *ext = tlv(
                                0x30,
                                &[parts[0].clone(), critical, parts[1].clone()].concat(),
                            );
                        }
                    }
                }),
            ),
            says: vec!["CRL of CN=Load Root marks its cRLNumber critical".into()],
        },
        LoadCase {
            name: "CRL file holding no CRL (a certificate)",
            trust: crl_trust(&root, root.pem.clone()),
            says: vec!["crl-0.pem: no CRL found".into()],
        },
        LoadCase {
            name: "CRL bundle whose second block is not a CRL",
            trust: crl_trust(
                &root,
                format!(
                    "{}{}",
                    root.crl(&[]),
                    pem("X509 CRL", &tlv(0x30, &tlv(0x02, &[1])))
                ),
            ),
            says: vec!["crl-0.pem#2: not a valid CRL".into()],
        },
    ]
}

/// DER of the cRLNumber extension's OID (2.5.29.20).
const CRL_NUMBER_OID: &[u8] = &[0x06, 0x03, 0x55, 0x1d, 0x14];

/// A trust of `root` with one CRL file holding `crls`.
fn crl_trust(root: &Ca, crls: String) -> Trust {
    Trust {
        bundle: vec![root.pem.clone()],
        crls: vec![crls],
        server: String::new(),
    }
}

/// `crl_pem`, issued by `ca`, re-signed by it after `change` edited its extensions (each a
/// whole DER Extension): CRLs that rcgen will not make.
fn crl_with_extensions(ca: &Ca, crl_pem: &str, change: impl Fn(&mut Vec<Vec<u8>>)) -> String {
    let der = CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes()).unwrap();
    let list = children(&der);
    let mut tbs = children(&list[0]);
    let at = tbs
        .iter()
        .position(|e| e[0] == 0xa0)
        .expect("crlExtensions");
    let mut extensions = children(&children(&tbs[at])[0]);
    change(&mut extensions);
    tbs[at] = tlv(0xa0, &tlv(0x30, &extensions.concat()));
    let tbs = tlv(0x30, &tbs.concat());
    let signature = [&[0u8][..], &ca.sign(&tbs)].concat();
    let list = [tbs, list[1].clone(), tlv(0x03, &signature)].concat();
    pem("X509 CRL", &tlv(0x30, &list))
}

#[test]
fn trust_configurations_that_must_not_load() {
    let mut failures = Vec::new();
    for case in load_cases() {
        let setup = setup_for(Some(&case.trust));
        match build(&setup) {
            Ok(_) => failures.push(format!("{}: loaded", case.name)),
            Err(problems) => {
                for phrase in &case.says {
                    if !problems.contains(phrase.as_str()) {
                        failures.push(format!("{}: {phrase:?} not in {problems}", case.name));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// check-config, the operator's tool, fails on a CRL that does not belong to its CA and
/// prints every CA's pin (and where each CRL's signature is checked) when all is well.
#[test]
fn check_config_refuses_a_foreign_crl_and_prints_pins() {
    let run = |setup: &Setup| {
        std::process::Command::new(support::binary())
            .args(["--log-format", "text", "-c"])
            .arg(setup.write_config())
            .arg("check-config")
            .output()
            .unwrap()
    };
    let mut setup = setup_for(None);
    setup.crl_pems = Some(vec![Ca::root("Test Device Root").crl(&[])]);
    let out = run(&setup);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is not validly signed by the CA"),
        "{stderr}"
    );

    let setup = setup_for(None);
    let pin = openssl_pin(&setup.root.pem);
    let out = run(&setup);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("root CA CN=Test Device Root") && stdout.contains(&pin),
        "{stdout}"
    );
    assert!(stdout.contains("verified against the bundle"), "{stdout}");
    assert!(stdout.contains("checked per request"), "{stdout}");
}

/// A reload with a CRL that its CA did not sign fails and keeps the running trust.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_with_a_foreign_crl_keeps_the_old_trust() {
    let setup = setup_for(None);
    let leaf = setup.intermediate.leaf(&LeafSpec::device("steady"));
    let foreign = Ca::root("Test Device Root").crl(&[leaf.serial]);
    let broker = setup.start().await;
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    broker.setup.write("root.crl.pem", &foreign);
    let problems = broker.live.reload().unwrap_err().to_string();
    assert!(
        problems.contains("is not validly signed by the CA"),
        "{problems}"
    );
    let (status, body) = broker
        .token(Some(&leaf), "grant_type=client_credentials")
        .await;
    assert_eq!(status, 200, "{body}");
    broker.stop().await;
}

/// The broker computes the pin exactly as the documented openssl command does.
#[test]
fn pins_match_openssl() {
    let setup = setup_for(None);
    let broker = build(&setup).unwrap();
    let root = broker.trust().cas.iter().find(|c| c.is_root).unwrap();
    assert_eq!(root.pin.to_string(), openssl_pin(&setup.root.pem));
}

/// A leaf webpki cannot parse fails the handshake (its signature cannot be checked), and
/// that failure is counted and logged with the reason `/token` would have given.
#[tokio::test(flavor = "multi_thread")]
async fn a_leaf_the_handshake_cannot_parse_is_refused_with_its_reason() {
    let setup = setup_for(None);
    let leaf = setup
        .intermediate
        .leaf_with(&LeafSpec::device("crit-tls"), |p| {
            p.custom_extensions.push(unknown_extension(true))
        });
    let broker = setup.start().await;
    let (expected, _) = outcome(&broker.live.current(), &leaf);
    assert_eq!(expected, Refuse("invalid_chain"));

    let sample = r#"token_broker_client_cert_rejections_total{reason="invalid_chain"}"#;
    let before = broker.metric(sample).await;
    // curl (OpenSSL) presents what rustls as a client would refuse to.
    let result = broker
        .curl_token(&leaf, "grant_type=client_credentials")
        .await;
    assert!(result.is_err(), "the handshake must fail: {result:?}");
    assert_eq!(
        broker.metric_eventually(sample, before + 1.0).await,
        before + 1.0
    );
}

/// A verdict taken from the verified-chain cache holds only for the chain that was validated,
/// from the time it was reached to the earliest notAfter or CRL nextUpdate it depended on: a
/// clock set back, a later request past one of those, or other certificates sent beside the
/// same leaf validate again (and may refuse).
#[test]
fn a_cached_verdict_holds_only_for_its_chain_from_its_time_to_the_paths_expiry() {
    let setup = setup_for(None);
    let leaf = setup.intermediate.leaf(&LeafSpec::device("cached"));
    let broker = build(&setup).unwrap();
    let with_junk = {
        let mut chain = leaf.chain();
        chain.push(Ca::root("Junk Sent Along").der.clone());
        chain
    };
    let at = |chain: &[CertificateDer<'static>], t: OffsetDateTime| {
        let t = rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            t.unix_timestamp() as u64,
        ));
        broker
            .authenticate(chain, t)
            .map(|_| ())
            .map_err(|r| r.reason())
    };
    let counts = || {
        let text = String::from_utf8(broker.metrics().render()).unwrap();
        let count = |result| {
            support::metric_value(
                &text,
                &format!("token_broker_verified_chain_cache_{result}_total"),
            )
        };
        (count("hits"), count("misses"))
    };
    let now = OffsetDateTime::now_utc();
    let chain = leaf.chain();
    assert_eq!(at(&chain, now), Ok(()));
    assert_eq!(at(&chain, now + Duration::minutes(1)), Ok(()));
    assert_eq!(counts(), (1.0, 1.0), "the second call reused the verdict");
    // Another chain with the same leaf is validated, and takes the leaf's one entry.
    assert_eq!(at(&with_junk, now), Ok(()));
    assert_eq!(at(&chain, now), Ok(()));
    assert_eq!(counts(), (1.0, 3.0));
    assert_eq!(at(&chain, now - Duration::hours(2)), Err("not_yet_valid"));
    // The CRLs' nextUpdate is a week away, the leaf's notAfter 30 days.
    assert_eq!(at(&chain, now + Duration::days(8)), Err("crl_expired"));
    assert_eq!(at(&chain, now + Duration::days(400)), Err("expired"));
}
