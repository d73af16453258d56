// Added by token-broker (see VENDORED.md): the URI, rfc822Name and directoryName name
// constraints of RFC 5280 4.2.1.10, which upstream refuses (fails closed). No allocation.

use super::dns_name::{IdRole, Wildcards, is_valid_dns_id};
use crate::der::{self, Tag};
use crate::error::Error;

/// Whether `host` (of a URI, or the domain of a mailbox) is within a URI or rfc822Name
/// `constraint`: one starting with "." holds the subdomains of that domain, not the domain
/// itself; any other holds exactly that host. Unlike dNSName, "example.org" holds no
/// subdomain. A constraint that is not a host is refused, and so is a host that is not a DNS
/// name, so that no spelling of a name can slip past an excluded subtree.
fn host_within(host: &[u8], constraint: &[u8]) -> Result<bool, Error> {
    let domain = constraint.strip_prefix(b".").unwrap_or(constraint);
    if !is_dns_name(domain) {
        return Err(Error::MalformedNameConstraint);
    }
    if !is_dns_name(host) {
        return Err(Error::NameConstraintViolation);
    }
    if domain.len() == constraint.len() {
        return Ok(host.eq_ignore_ascii_case(constraint));
    }
    Ok(host
        .len()
        .checked_sub(constraint.len())
        .filter(|start| *start > 0)
        .and_then(|start| host.get(start..))
        .is_some_and(|tail| tail.eq_ignore_ascii_case(constraint)))
}

fn is_dns_name(name: &[u8]) -> bool {
    is_valid_dns_id(
        untrusted::Input::from(name),
        IdRole::Presented,
        Wildcards::Deny,
    )
}

/// rfc822Name: a constraint with "@" is one mailbox (local part compared exactly, domain
/// without case); one without is a host or a domain as in [`host_within`]. The address
/// splits at its last "@", as OpenSSL does.
pub(super) fn email_within(email: &[u8], constraint: &[u8]) -> Result<bool, Error> {
    let (local, domain) = split_at_last(email, b'@').ok_or(Error::NameConstraintViolation)?;
    if local.is_empty() {
        return Err(Error::NameConstraintViolation);
    }
    match split_at_last(constraint, b'@') {
        Some((want_local, want_domain)) => {
            if want_local.is_empty() || want_domain.starts_with(b".") {
                return Err(Error::MalformedNameConstraint);
            }
            Ok(host_within(domain, want_domain)? && local == want_local)
        }
        None => host_within(domain, constraint),
    }
}

fn split_at_last(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().rposition(|b| *b == separator)?;
    Some((bytes.get(..at)?, bytes.get(at + 1..)?))
}

/// uniformResourceIdentifier: the constraint applies to the host of the URI
/// (`scheme://host[:port][/path][?query][#fragment]`). A URI without a host is refused
/// under any URI constraint (as OpenSSL does), and so is one whose host is an IP address:
/// RFC 5280 4.2.1.10 says such a certificate MUST be rejected (OpenSSL compares the literal
/// as a host, so an excluded subtree does not hold it). So is a URI with userinfo
/// (`https://example.org@evil.org/`): its host is plain to RFC 3986 but not to every
/// reader (OpenSSL takes `example.org@evil.org` for the host, so an excluded `evil.org`
/// does not hold it), and no device needs one.
pub(super) fn uri_within(uri: &[u8], constraint: &[u8]) -> Result<bool, Error> {
    match uri_host(uri).ok_or(Error::NameConstraintViolation)? {
        UriHost::Name(host) => host_within(host, constraint),
        UriHost::IpLiteral => Err(Error::NameConstraintViolation),
    }
}

enum UriHost<'a> {
    Name(&'a [u8]),
    IpLiteral,
}

fn uri_host(uri: &[u8]) -> Option<UriHost<'_>> {
    let (scheme, rest) = split_at_first(uri, b':')?;
    let scheme_ok = scheme.first().is_some_and(u8::is_ascii_alphabetic)
        && scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return None;
    }
    let rest = rest.strip_prefix(b"//")?;
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let authority = rest.get(..end)?;
    if authority.contains(&b'@') {
        return None;
    }
    let host_port = authority;
    if let Some(literal) = host_port.strip_prefix(b"[") {
        // IPv6 or IPvFuture literal; the rest must be "]" and an optional port.
        let (_, port) = split_at_first(literal, b']')?;
        return port_ok(port).then_some(UriHost::IpLiteral);
    }
    let (host, port) = match split_at_first(host_port, b':') {
        Some((host, port)) => (host, port),
        None => (host_port, &[][..]),
    };
    if host.is_empty() || !port.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if is_ipv4_like(host) {
        return Some(UriHost::IpLiteral);
    }
    Some(UriHost::Name(host))
}

/// An IPv4 address as any URL parser might read one: RFC 3986's dotted quad, and what the
/// WHATWG URL standard also takes for one (a host whose last label is a number, decimal or
/// "0x" hex: `10.1`, `0x7f000001`), so that no spelling passes for a host name.
fn is_ipv4_like(host: &[u8]) -> bool {
    let host = host.strip_suffix(b".").unwrap_or(host);
    let last = match split_at_last(host, b'.') {
        Some((_, last)) => last,
        None => host,
    };
    let hex = last
        .strip_prefix(b"0x")
        .or_else(|| last.strip_prefix(b"0X"));
    match hex {
        Some(digits) => digits.iter().all(u8::is_ascii_hexdigit),
        None => !last.is_empty() && last.iter().all(u8::is_ascii_digit),
    }
}

/// What follows an IP literal's "]": nothing, or ":" and a port.
fn port_ok(rest: &[u8]) -> bool {
    match rest.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    }
}

fn split_at_first(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|b| *b == separator)?;
    Some((bytes.get(..at)?, bytes.get(at + 1..)?))
}

/// directoryName: `name` (the contents of an RDNSequence) is within `constraint` when it
/// begins with the constraint's RDNs (RFC 5280 7.1). Two RDNs are equal when they hold the
/// same attributes in any order (a multiset: `O=Evil+OU=Ops` is `OU=ops+O=evil`); two
/// attributes when their types are equal and their values are equal text as OpenSSL
/// canonicalizes it: decoded from any string type to characters, ASCII case, leading and
/// trailing whitespace and runs of whitespace ignored.
///
/// A name holding a value that cannot be decoded to text (a malformed string, or a type
/// that is no text) is refused under any directoryName constraint, so that no encoding of
/// a name can slip past an excluded subtree; a constraint holding one is malformed.
pub(super) fn directory_name_within(
    name: untrusted::Input<'_>,
    constraint: untrusted::Input<'_>,
) -> Result<bool, Error> {
    all_decodable(constraint, Error::MalformedNameConstraint)?;
    all_decodable(name, Error::NameConstraintViolation)?;
    let mut name = untrusted::Reader::new(name);
    let mut constraint = untrusted::Reader::new(constraint);
    while !constraint.at_end() {
        let wanted = der::expect_tag(&mut constraint, Tag::Set)?;
        if name.at_end() {
            return Ok(false);
        }
        let rdn = der::expect_tag(&mut name, Tag::Set)?;
        if !rdn_eq(rdn, wanted)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Every attribute value of the RDNSequence contents `name` decodes to text, else `error`.
fn all_decodable(name: untrusted::Input<'_>, error: Error) -> Result<(), Error> {
    let mut rdns = untrusted::Reader::new(name);
    while !rdns.at_end() {
        let mut rdn = untrusted::Reader::new(der::expect_tag(&mut rdns, Tag::Set)?);
        while !rdn.at_end() {
            let (_, tag, value) = attribute(&mut rdn)?;
            if Text::new(tag, value).is_none() {
                return Err(error);
            }
        }
    }
    Ok(())
}

/// The most attributes one RDN may hold here (real names hold one, rarely a few); more are
/// refused. It bounds the work of comparing two RDNs and fits the bitmap of `rdn_eq`.
const MAX_ATTRIBUTES: usize = 16;

/// Whether the RDNs (SET contents) `a` and `b` hold the same attributes, in any order.
fn rdn_eq(a: untrusted::Input<'_>, b: untrusted::Input<'_>) -> Result<bool, Error> {
    let (a_count, b_count) = (attribute_count(a)?, attribute_count(b)?);
    if a_count != b_count {
        return Ok(false);
    }
    // Each attribute of `a` takes an equal one of `b` not yet taken. Equality of canonical
    // text is an equivalence, so taking the first free equal one never misses a pairing.
    let mut taken: u32 = 0;
    let mut a = untrusted::Reader::new(a);
    while !a.at_end() {
        let (a_type, a_tag, a_value) = attribute(&mut a)?;
        let mut b_reader = untrusted::Reader::new(b);
        let mut found = false;
        let mut index = 0;
        while !b_reader.at_end() {
            let (b_type, b_tag, b_value) = attribute(&mut b_reader)?;
            let bit = 1u32 << index;
            index += 1;
            if taken & bit == 0 && a_type == b_type && value_eq((a_tag, a_value), (b_tag, b_value))
            {
                taken |= bit;
                found = true;
                break;
            }
        }
        if !found {
            return Ok(false);
        }
    }
    Ok(true)
}

fn attribute_count(rdn: untrusted::Input<'_>) -> Result<usize, Error> {
    let mut rdn = untrusted::Reader::new(rdn);
    let mut count = 0;
    while !rdn.at_end() {
        attribute(&mut rdn)?;
        count += 1;
        if count > MAX_ATTRIBUTES {
            return Err(Error::NameConstraintViolation);
        }
    }
    Ok(count)
}

/// The next AttributeTypeAndValue of an RDN: (type OID, value tag, value).
pub(super) fn attribute<'a>(
    rdn: &mut untrusted::Reader<'a>,
) -> Result<(&'a [u8], u8, &'a [u8]), Error> {
    let ava = der::expect_tag(rdn, Tag::Sequence)?;
    ava.read_all(Error::BadDer, |ava| {
        let kind = der::expect_tag(ava, Tag::OID)?;
        let (tag, value) = der::read_tag_and_get_value(ava)?;
        Ok((kind.as_slice_less_safe(), tag, value.as_slice_less_safe()))
    })
}

/// Values that are not both text are unequal (callers have refused such names already).
fn value_eq(a: (u8, &[u8]), b: (u8, &[u8])) -> bool {
    match (Text::new(a.0, a.1), Text::new(b.0, b.1)) {
        (Some(a), Some(b)) => canonical(a).eq(canonical(b)),
        _ => false,
    }
}

const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const T61_STRING: u8 = 0x14;
pub(super) const IA5_STRING: u8 = 0x16;
const VISIBLE_STRING: u8 = 0x1a;
const UNIVERSAL_STRING: u8 = 0x1c;
const BMP_STRING: u8 = 0x1e;

/// A string value that decodes to characters, each type as OpenSSL reads it: UTF8String as
/// UTF-8, TeletexString (T61String) as Latin-1, BMPString as UCS-2 (big-endian code points
/// of the BMP, as X.680 defines it: a surrogate, even one of a UTF-16 pair, does not
/// decode; OpenSSL cannot read one either), UniversalString as UTF-32BE. PrintableString,
/// IA5String and VisibleString are ASCII (a byte above 0x7f is none of theirs: OpenSSL
/// would read it as Latin-1, a UTF-8 reading would differ, so it is refused). Any other
/// type, or bytes that do not decode, are no text.
#[derive(Clone, Copy)]
enum Text<'a> {
    Latin1(&'a [u8]),
    Utf8(&'a str),
    Ucs2(&'a [u8]),
    Utf32(&'a [u8]),
}

impl<'a> Text<'a> {
    fn new(tag: u8, value: &'a [u8]) -> Option<Self> {
        let text = match tag {
            UTF8_STRING => Text::Utf8(core::str::from_utf8(value).ok()?),
            PRINTABLE_STRING | IA5_STRING | VISIBLE_STRING if value.is_ascii() => {
                Text::Latin1(value)
            }
            T61_STRING => Text::Latin1(value),
            BMP_STRING if value.len() % 2 == 0 => Text::Ucs2(value),
            UNIVERSAL_STRING if value.len() % 4 == 0 => Text::Utf32(value),
            _ => return None,
        };
        // Every character decodes (checked once, so that `chars` need not).
        text.raw_chars().all(|c| c.is_some()).then_some(text)
    }

    fn raw_chars(self) -> impl Iterator<Item = Option<char>> + 'a {
        let (latin1, utf8, wide, width): (&[u8], &str, &[u8], usize) = match self {
            Text::Latin1(b) => (b, "", &[], 2),
            Text::Utf8(s) => (&[], s, &[], 2),
            Text::Ucs2(b) => (&[], "", b, 2),
            Text::Utf32(b) => (&[], "", b, 4),
        };
        // A code point per unit of 2 (UCS-2) or 4 (UTF-32) bytes; a surrogate is no char.
        latin1
            .iter()
            .map(|b| Some(char::from(*b)))
            .chain(utf8.chars().map(Some))
            .chain(
                wide.chunks_exact(width).map(|c| {
                    char::from_u32(c.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
                }),
            )
    }
}

/// The characters of `text` as OpenSSL canonicalizes them: ASCII lowercase, no leading or
/// trailing whitespace, every run of whitespace one space.
fn canonical(text: Text<'_>) -> impl Iterator<Item = char> + '_ {
    let mut space = false;
    let mut started = false;
    text.raw_chars()
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .flat_map(move |c| {
            if is_space(c) {
                space = started;
                return [None, None];
            }
            started = true;
            let before = core::mem::take(&mut space).then_some(' ');
            [before, Some(c.to_ascii_lowercase())]
        })
        .flatten()
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_hosts() {
        let within =
            |uri: &str, constraint: &str| uri_within(uri.as_bytes(), constraint.as_bytes());
        assert_eq!(
            within("spiffe://example.org/device/1", "example.org"),
            Ok(true)
        );
        assert_eq!(within("spiffe://Example.ORG", "example.org"), Ok(true));
        assert_eq!(within("spiffe://other.org/x", "example.org"), Ok(false));
        assert_eq!(within("spiffe://a.example.org/x", "example.org"), Ok(false));
        assert_eq!(within("spiffe://a.example.org/x", ".example.org"), Ok(true));
        assert_eq!(within("spiffe://example.org/x", ".example.org"), Ok(false));
        assert_eq!(
            within("spiffe://badexample.org/x", ".example.org"),
            Ok(false)
        );
        assert_eq!(
            within("https://example.org:8443/a?b#c", "example.org"),
            Ok(true)
        );
        assert_eq!(
            within("https://example.org?q=@evil.org", "example.org"),
            Ok(true)
        );
        for ip in [
            "https://[2001:db8::1]:443/",
            "https://[::1]",
            "https://10.0.0.1/",
            "https://u@10.0.0.1:80/",
            "https://10.1/",
            "https://0x7f000001/",
            "https://a.0X1f/",
        ] {
            for constraint in ["example.org", ".example.org"] {
                assert_eq!(
                    within(ip, constraint),
                    Err(Error::NameConstraintViolation),
                    "{ip}"
                );
            }
        }
        assert_eq!(within("https://0x.example.org/", ".example.org"), Ok(true));
        for bad in [
            "urn:example.org",
            "example.org",
            "spiffe:///x",
            "https://:80/",
            "1s://a.b/",
            "https://a.b:x/",
            "https://u:p@example.org:8443/a?b#c",
            "https://example.org@evil.org/",
            "https://@example.org/",
        ] {
            assert_eq!(
                within(bad, "example.org"),
                Err(Error::NameConstraintViolation),
                "{bad}"
            );
        }
        assert_eq!(
            within("https://ex%61mple.org/", "example.org"),
            Err(Error::NameConstraintViolation)
        );
        for bad in ["spiffe://example.org", "", ".", "example.org."] {
            assert_eq!(
                within("spiffe://example.org/x", bad),
                Err(Error::MalformedNameConstraint),
                "{bad}"
            );
        }
    }

    #[test]
    fn emails() {
        let within =
            |email: &str, constraint: &str| email_within(email.as_bytes(), constraint.as_bytes());
        assert_eq!(within("Alice@Example.org", "Alice@example.ORG"), Ok(true));
        assert_eq!(within("alice@example.org", "Alice@example.org"), Ok(false));
        assert_eq!(within("bob@example.org", "alice@example.org"), Ok(false));
        assert_eq!(within("bob@example.org", "example.org"), Ok(true));
        assert_eq!(within("bob@mail.example.org", "example.org"), Ok(false));
        assert_eq!(within("bob@mail.example.org", ".example.org"), Ok(true));
        assert_eq!(within("bob@example.org", ".example.org"), Ok(false));
        assert_eq!(within("\"a@b\"@example.org", "example.org"), Ok(true));
        for bad in ["example.org", "@example.org", "bob@", "bob@[10.0.0.1]"] {
            assert_eq!(
                within(bad, "example.org"),
                Err(Error::NameConstraintViolation),
                "{bad}"
            );
        }
        for bad in ["@example.org", "a@.example.org", "a@", "", "exa mple.org"] {
            assert_eq!(
                within("a@example.org", bad),
                Err(Error::MalformedNameConstraint),
                "{bad}"
            );
        }
    }

    fn tlv(tag: u8, contents: &[u8]) -> std::vec::Vec<u8> {
        let mut out = std::vec![tag, contents.len() as u8];
        out.extend_from_slice(contents);
        out
    }

    /// RDNSequence contents: one single-attribute RDN per (OID contents, tag, value).
    fn rdns(attributes: &[(&[u8], u8, &[u8])]) -> std::vec::Vec<u8> {
        attributes
            .iter()
            .flat_map(|(oid, tag, value)| {
                tlv(
                    0x31,
                    &tlv(0x30, &[tlv(0x06, oid), tlv(*tag, value)].concat()),
                )
            })
            .collect()
    }

    #[test]
    fn directory_names() {
        const O: &[u8] = &[0x55, 0x04, 0x0a];
        const CN: &[u8] = &[0x55, 0x04, 0x03];
        let within = |name: &[u8], constraint: &[u8]| {
            directory_name_within(
                untrusted::Input::from(name),
                untrusted::Input::from(constraint),
            )
        };
        let acme = rdns(&[(O, UTF8_STRING, b"Acme")]);
        let leaf = rdns(&[(O, UTF8_STRING, b"Acme"), (CN, UTF8_STRING, b"leaf")]);
        assert_eq!(within(&leaf, &acme), Ok(true));
        assert_eq!(within(&leaf, &leaf), Ok(true));
        assert_eq!(within(&acme, &leaf), Ok(false));
        assert_eq!(within(&leaf, &[]), Ok(true));
        let other = rdns(&[(O, UTF8_STRING, b"Other"), (CN, UTF8_STRING, b"leaf")]);
        assert_eq!(within(&other, &acme), Ok(false));
        let cn_first = rdns(&[(CN, UTF8_STRING, b"leaf"), (O, UTF8_STRING, b"Acme")]);
        assert_eq!(within(&cn_first, &acme), Ok(false));
        for same in [
            rdns(&[(O, PRINTABLE_STRING, b"ACME")]),
            rdns(&[(O, UTF8_STRING, b"  acme ")]),
            rdns(&[(O, BMP_STRING, b"\0A\0c\0m\0e")]),
        ] {
            assert_eq!(within(&same, &acme), Ok(true));
        }
        assert_eq!(
            within(&rdns(&[(O, UTF8_STRING, b"Ac me")]), &acme),
            Ok(false)
        );
        assert_eq!(
            within(
                &rdns(&[(O, UTF8_STRING, b"a  b\t c")]),
                &rdns(&[(O, UTF8_STRING, b"A B C")])
            ),
            Ok(true)
        );
        // A T61String is Latin-1, as OpenSSL reads it.
        assert_eq!(within(&rdns(&[(O, T61_STRING, b"acme")]), &acme), Ok(true));
        let e_acute = rdns(&[(O, UTF8_STRING, "\u{e9}".as_bytes())]);
        assert_eq!(
            within(&rdns(&[(O, T61_STRING, b"\xe9")]), &e_acute),
            Ok(true)
        );
        assert_eq!(
            within(&rdns(&[(O, T61_STRING, b"\xc9")]), &e_acute),
            Ok(false)
        );
        // UCS-2 (a surrogate pair does not decode, below) and UTF-32.
        let clef = rdns(&[(O, UTF8_STRING, "\u{1d11e}".as_bytes())]);
        assert_eq!(
            within(
                &rdns(&[(O, BMP_STRING, b"\x01\x00")]),
                &rdns(&[(O, UTF8_STRING, "\u{100}".as_bytes())])
            ),
            Ok(true)
        );
        assert_eq!(
            within(&rdns(&[(O, UNIVERSAL_STRING, b"\0\x01\xd1\x1e")]), &clef),
            Ok(true)
        );
        // Values that are no text are refused, under any constraint, wherever they are.
        for bad in [
            rdns(&[(O, 0x04, b"Acme")]),
            rdns(&[(O, 0x12, b"123")]),
            rdns(&[(O, UTF8_STRING, b"Ac\xffme")]),
            rdns(&[(O, PRINTABLE_STRING, b"Acm\xe9")]),
            rdns(&[(O, BMP_STRING, b"\0A\0")]),
            rdns(&[(O, BMP_STRING, b"\xd8\x34")]),
            rdns(&[(O, BMP_STRING, b"\xd8\x34\xdd\x1e")]),
            rdns(&[(O, UNIVERSAL_STRING, b"\0\x11\0\0")]),
            rdns(&[(O, UTF8_STRING, b"Other"), (CN, UTF8_STRING, b"\xff")]),
        ] {
            assert_eq!(within(&bad, &acme), Err(Error::NameConstraintViolation));
        }
        assert_eq!(
            within(&acme, &rdns(&[(O, UTF8_STRING, b"\xff")])),
            Err(Error::MalformedNameConstraint)
        );
        // Multi-valued RDNs are sets: any order, whitespace and case as above.
        let set = |avas: &[(&[u8], u8, &[u8])]| {
            let contents: std::vec::Vec<u8> = avas
                .iter()
                .flat_map(|(oid, tag, value)| {
                    tlv(0x30, &[tlv(0x06, oid), tlv(*tag, value)].concat())
                })
                .collect();
            tlv(0x31, &contents)
        };
        const OU: &[u8] = &[0x55, 0x04, 0x0b];
        let evil_ops = set(&[(O, UTF8_STRING, b"Evil"), (OU, UTF8_STRING, b"Ops")]);
        for same in [
            set(&[(OU, UTF8_STRING, b"  ops  "), (O, UTF8_STRING, b"Evil")]),
            set(&[(O, T61_STRING, b"EVIL"), (OU, PRINTABLE_STRING, b"ops")]),
        ] {
            assert_eq!(within(&same, &evil_ops), Ok(true));
        }
        for other in [
            set(&[(O, UTF8_STRING, b"Evil")]),
            set(&[(O, UTF8_STRING, b"Evil"), (O, UTF8_STRING, b"Evil")]),
            set(&[
                (O, UTF8_STRING, b"Evil"),
                (OU, UTF8_STRING, b"Ops"),
                (CN, UTF8_STRING, b"x"),
            ]),
            set(&[(O, UTF8_STRING, b"Ops"), (OU, UTF8_STRING, b"Evil")]),
        ] {
            assert_eq!(within(&other, &evil_ops), Ok(false));
        }
        assert_eq!(
            within(&rdns(&[(CN, UTF8_STRING, b"Acme")]), &acme),
            Ok(false)
        );
    }
}
