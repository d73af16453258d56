//! The few DER elements the broker reads itself (a CRL's signed part, a key inside its
//! SubjectPublicKeyInfo, whether a file is one DER object), where the parsers it uses do not
//! hand them out.

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
