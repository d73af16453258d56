//! Every log line of the test suite is checked for secrets. In-process brokers log (at
//! `trace` for this crate, in the production JSON format) into one buffer for the whole
//! test crate (one process), which each `TestBroker` scans when it is dropped; tests that
//! run the binary scan its stderr with [`assert_no_secrets`]. What counts as a secret: a JWT, a Google access token, a PEM
//! block, base64 DER (certificates and keys start `MI`/`MH`), and the body of any private
//! key the tests wrote (registered by `Setup::write`).

use std::io::Write;
use std::sync::{Mutex, OnceLock};

struct Captured {
    bytes: Vec<u8>,
    /// How far `check_captured` has read.
    scanned: usize,
}

static CAPTURED: Mutex<Captured> = Mutex::new(Captured {
    bytes: Vec::new(),
    scanned: 0,
});
static KNOWN_KEYS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut captured = CAPTURED.lock().unwrap_or_else(|e| e.into_inner());
        captured.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Sends the test process's logs to the buffer (once; later calls do nothing).
pub fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .event_format(token_broker::logging::JsonLines)
            .with_env_filter("token_broker=trace,audit=trace,info")
            .with_writer(|| Capture)
            .try_init();
    });
}

/// Remembers a private key the tests wrote, so that its bytes are looked for in logs.
pub fn register_key(pem: &str) {
    // A key inside JSON (a service-account key file) has its newlines escaped.
    let pem = pem.replace("\\n", "\n");
    let lines = pem
        .lines()
        .filter(|line| !line.starts_with("-----") && line.len() >= 32)
        .map(str::to_owned);
    KNOWN_KEYS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(lines);
}

/// The first secret in `text`: (what it looks like, the line it is on).
pub fn find_secret(text: &str) -> Option<(&'static str, String)> {
    let known = KNOWN_KEYS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    text.lines().find_map(|line| {
        let what = if contains_jwt(line) {
            "a JWT"
        } else if line.contains("ya29.") {
            "a Google access token"
        } else if line.contains("-----BEGIN") {
            "a PEM block"
        } else if contains_der_base64(line) {
            "base64 DER (a certificate or key)"
        } else if known.iter().any(|key| line.contains(key.as_str())) {
            "a private key written by the tests"
        } else {
            return None;
        };
        Some((what, line.chars().take(300).collect()))
    })
}

/// Panics naming `source` and the line if `text` holds a secret.
pub fn assert_no_secrets(text: &str, source: &str) {
    if let Some((what, line)) = find_secret(text) {
        panic!("{source} logged {what}: {line}");
    }
}

/// Scans what in-process brokers logged since the last call.
pub fn check_captured(source: &str) {
    let text = {
        let mut captured = CAPTURED.lock().unwrap_or_else(|e| e.into_inner());
        // Up to the last complete line: a concurrent writer may be mid-line.
        let end = captured.bytes[captured.scanned..]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(captured.scanned, |i| captured.scanned + i + 1);
        let text = String::from_utf8_lossy(&captured.bytes[captured.scanned..end]).into_owned();
        captured.scanned = end;
        text
    };
    assert_no_secrets(&text, source);
}

/// All that in-process brokers logged so far (for tests about the log itself).
pub fn captured() -> String {
    let captured = CAPTURED.lock().unwrap_or_else(|e| e.into_inner());
    String::from_utf8_lossy(&captured.bytes).into_owned()
}

fn is_b64url(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// `eyJ` (base64url of `{"`) followed by two dot-separated base64url segments.
fn contains_jwt(line: &str) -> bool {
    let bytes = line.as_bytes();
    line.match_indices("eyJ").any(|(start, _)| {
        let mut dots = 0;
        let mut run = 0;
        for &b in &bytes[start..] {
            if b == b'.' && run >= 4 {
                dots += 1;
                run = 0;
                if dots == 2 {
                    return true;
                }
            } else if is_b64url(b) {
                run += 1;
            } else {
                return false;
            }
        }
        false
    })
}

/// `MI`/`MH` followed by 60 or more base64 characters: the start of a DER SEQUENCE.
fn contains_der_base64(line: &str) -> bool {
    let bytes = line.as_bytes();
    let b64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    line.match_indices('M').any(|(start, _)| {
        matches!(bytes.get(start + 1), Some(b'I' | b'H'))
            && bytes[start..].iter().take_while(|b| b64(b)).count() >= 62
    })
}

#[test]
fn the_scanner_finds_each_kind_of_secret_and_passes_ordinary_lines() {
    let jwt = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJkZXZpY2UifQ.MEUCIQDx";
    let der = format!("MIIB{}", "kTCCATegAwIBAgIU".repeat(5));
    for (line, what) in [
        (format!(r#"{{"msg":"x","token":"{jwt}"}}"#), "a JWT"),
        ("access ya29.fake-1234".to_owned(), "a Google access token"),
        ("-----BEGIN PRIVATE KEY-----".to_owned(), "a PEM block"),
        (format!("cert={der}"), "base64 DER (a certificate or key)"),
    ] {
        assert_eq!(find_secret(&line).map(|f| f.0), Some(what), "{line}");
    }
    register_key("-----BEGIN PRIVATE KEY-----\nQUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0\n-----END PRIVATE KEY-----\n");
    assert!(find_secret("key QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0 leaked").is_some());
    for ordinary in [
        r#"{"level":"INFO","fields":{"message":"token decision","subject":"spiffe://test.example/device/eyJ","cert_sha256":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","result":"issued"}}"#,
        "audience //iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/fleet/providers/broker",
        "MIDDLE of a sentence with Mission and MHz",
    ] {
        assert_eq!(find_secret(ordinary), None, "{ordinary}");
    }
}

/// The value of `key=` in a text line.
pub fn text_field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 2;
    line[start..].split(' ').next().unwrap()
}
