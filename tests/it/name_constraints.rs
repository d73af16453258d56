//! Name constraints of every form (RFC 5280 4.2.1.10: dNSName, iPAddress,
//! uniformResourceIdentifier, rfc822Name, directoryName; permitted and excluded), decided by
//! the broker (`Broker::authenticate`) and by `openssl verify` on the same generated chains
//! (root -> intermediate with the constraint -> leaf). Both must give the expected answer
//! for every case. The policy rows are in `conformance.rs`.

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
}

struct Case {
    base: Base,
    excluded: bool,
    name: Name,
    accept: bool,
}

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
    cases
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
    }
}

fn describe(case: &Case) -> String {
    let base = match &case.base {
        Base::Dns(v) => format!("dNSName {v}"),
        Base::Ip(v) => format!("iPAddress {v}"),
        Base::Email(v) => format!("rfc822Name {v}"),
        Base::Uri(v) => format!("URI {v}"),
        Base::Org(v) => format!("directoryName O={v}"),
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

    let mut table = vec!["constraint | leaf name | expected | broker | openssl".to_owned()];
    let mut disagree = false;
    for (i, case) in cases().iter().enumerate() {
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
        let ok = broker_accepts == case.accept && openssl_accepts == case.accept;
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
        table.push(format!(
            "{} | {} | {}{broker_detail} | {}{openssl_detail}{}",
            describe(case),
            verdict(case.accept),
            verdict(broker_accepts),
            verdict(openssl_accepts),
            if ok { "" } else { "   <-- differs" }
        ));
    }
    println!("{}", table.join("\n"));
    assert!(!disagree, "verdicts differ:\n{}", table.join("\n"));
}
