//! The few DER elements the broker reads itself (a CRL's signed part, a key inside its
//! SubjectPublicKeyInfo, whether a file is one DER object), where the parsers it uses do not
//! hand them out; and the one it writes (an ECDSA signature from a PKCS#11 module).

pub(crate) const SEQUENCE: u8 = 0x30;
pub(crate) const BIT_STRING: u8 = 0x03;

/// Whether `bytes` is exactly one DER SEQUENCE (what a DER CRL file is); text never is.
pub(crate) fn is_one_sequence(bytes: &[u8]) -> bool {
    element(bytes, SEQUENCE).is_some_and(|(_, rest)| rest.is_empty())
}

/// The contents of the DER element with `tag` at the start of `input`, and what follows.
pub(crate) fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    element_with_header(input, tag).map(|(contents, _, rest)| (contents, rest))
}

/// Like [`element`], also returning the whole element (tag and length included).
pub(crate) fn element_with_header(input: &[u8], tag: u8) -> Option<(&[u8], &[u8], &[u8])> {
    let (&found, after_tag) = input.split_first()?;
    let (&first, after_length) = after_tag.split_first()?;
    if found != tag {
        return None;
    }
    let (length, body) = if first < 0x80 {
        (usize::from(first), after_length)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || after_length.len() < count {
            return None;
        }
        let (bytes, body) = after_length.split_at(count);
        let length = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (length, body)
    };
    if body.len() < length {
        return None;
    }
    let (contents, rest) = body.split_at(length);
    let whole = &input[..input.len() - rest.len()];
    Some((contents, whole, rest))
}

pub(crate) const INTEGER: u8 = 0x02;

/// The DER element with `tag` and `contents`.
pub(crate) fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(contents.len() + 6);
    out.push(tag);
    let length = contents.len();
    if length < 0x80 {
        out.push(length as u8);
    } else {
        let bytes = length.to_be_bytes();
        let significant = &bytes[bytes.iter().take_while(|b| **b == 0).count()..];
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(contents);
    out
}

/// The DER `Ecdsa-Sig-Value` (RFC 3279) TLS wants, from PKCS#11's `r || s` (two
/// equal-length big-endian numbers); `None` for anything else.
pub(crate) fn ecdsa_signature(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || !raw.len().is_multiple_of(2) {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    let integer = |value: &[u8]| {
        let start = value
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(value.len() - 1);
        let value = &value[start..];
        // A leading bit of 1 would read as negative: prefix a zero byte.
        let sign = if value[0] & 0x80 != 0 {
            &[0u8][..]
        } else {
            &[]
        };
        tlv(INTEGER, &[sign, value].concat())
    };
    Some(tlv(SEQUENCE, &[integer(r), integer(s)].concat()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecdsa_signatures_become_der_integers() {
        assert_eq!(
            ecdsa_signature(&[0x00, 0x01, 0x80, 0x02]).unwrap(),
            [0x30, 0x08, 0x02, 0x01, 0x01, 0x02, 0x03, 0x00, 0x80, 0x02]
        );
        assert_eq!(
            ecdsa_signature(&[0, 0, 0, 0]).unwrap(),
            [0x30, 0x06, 0x02, 0x01, 0x00, 0x02, 0x01, 0x00]
        );
        assert_eq!(ecdsa_signature(&[1, 2, 3]), None);
        assert_eq!(ecdsa_signature(&[]), None);
        let long = ecdsa_signature(&[0xff; 132]).unwrap();
        assert_eq!(&long[..3], [0x30, 0x81, 0x8a]);
    }
}
