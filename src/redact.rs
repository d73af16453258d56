//! What the broker repeats of others' words: a client's parameter in an error description,
//! the cause of a failed HTTP call in a message. Secrets never pass through here.

/// A client's parameter value as error descriptions repeat it: quoted and cut to 100
/// characters, and not at all when shaped like a credential (a JWT, a Google access token,
/// a PEM block), so a secret pasted into the wrong parameter is not sent back or kept.
pub fn echo(value: &str) -> String {
    let looks_like_jwt = value.starts_with("eyJ") && value.matches('.').count() >= 2;
    if looks_like_jwt || value.contains("ya29.") || value.contains("-----BEGIN") {
        return "(a value shaped like a credential, not repeated)".into();
    }
    match value.char_indices().nth(100) {
        Some((end, _)) => format!("{:?}...", &value[..end]),
        None => format!("{value:?}"),
    }
}

/// The innermost cause of an error: the part that says what went wrong (reqwest's outer
/// layers only say that a request failed).
pub fn root_cause(error: &dyn std::error::Error) -> String {
    let mut cause = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::echo;

    #[test]
    fn echo_quotes_cuts_and_never_repeats_credentials() {
        assert_eq!(echo("aud-x"), "\"aud-x\"");
        assert_eq!(
            echo(&"a".repeat(150)),
            format!("\"{}\"...", "a".repeat(100))
        );
        assert_eq!(echo(&"é".repeat(101)).chars().count(), 105);
        assert_eq!(echo("a\u{1b}[2J\n\"b"), r#""a\u{1b}[2J\n\"b""#);
        for secret in [
            "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
            "ya29.a0AfH6SMC",
            "-----BEGIN PRIVATE KEY-----\nMIGHAgEA",
        ] {
            assert!(!echo(secret).contains(&secret[..6]), "{secret}");
        }
    }
}
