//! docs/reference/ is complete: every config key the parser accepts is documented there and
//! in config.toml, and every metric the registry exposes is documented in metrics.md. The
//! lists come from the code (serialized `Config`, the metrics' own descriptions), so a new
//! field or metric fails here until it is documented.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;
use token_broker::config::Config;
use token_broker::metrics::Metrics;

fn read(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A config with every optional table and list of tables present, so that serializing it
/// shows every key (a `None` scalar serializes as `null`, still a key).
const MAXIMAL: &str = r#"
[dev]
pki_dir = "dev"
[audit]
path = "audit.log"
[server]
listen = "127.0.0.1:1"
cert = "c.pem"
key = "k.pem"
client_ca = "ca.pem"
[[server.crl_sources]]
url = "http://pki.example/ca.crl"
[issuer]
url = "https://broker.example"
[google]
project_number = "1"
pool_id = "p"
provider_id = "r"
[[clients]]
name = "all"
rate_limit = { requests_per_minute = 1 }
"#;

const LOCAL_SIGNER: &str = "[signer]\nkind = \"local\"\nkey_dir = \"keys\"\n";
const IAM_SIGNER: &str =
    "[signer]\nkind = \"iam\"\nservice_account = \"s@p.iam.gserviceaccount.com\"\n";

/// The dotted paths of a value's leaves. A list of tables is walked through its first
/// element; an empty table (e.g. `clients.claims`) is a leaf.
fn leaves(prefix: &str, value: &Value, out: &mut BTreeSet<String>) {
    let child = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                leaves(&child(key), value, out);
            }
        }
        Value::Array(items) if items.first().is_some_and(Value::is_object) => {
            leaves(prefix, &items[0], out)
        }
        _ => {
            out.insert(prefix.to_owned());
        }
    }
}

/// Every key the parser accepts, both signer kinds included.
fn config_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for signer in [LOCAL_SIGNER, IAM_SIGNER] {
        let config = Config::parse(&format!("{MAXIMAL}{signer}"))
            .unwrap_or_else(|e| panic!("the maximal config must parse: {e}"));
        let value = serde_json::to_value(&config).expect("a config serializes");
        leaves("", &value, &mut keys);
    }
    keys
}

/// The keys `config.toml` sets or shows as a commented example: each line (without a
/// leading `#`) that is a table header, or that parses as TOML on its own, under the last
/// header.
fn config_toml_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim_start_matches('#').trim();
        let header = line.split('#').next().unwrap_or_default().trim();
        if let Some(name) = header
            .strip_prefix("[[")
            .and_then(|h| h.strip_suffix("]]"))
            .or_else(|| header.strip_prefix('[').and_then(|h| h.strip_suffix(']')))
        {
            section = name.trim().to_owned();
            continue;
        }
        if let Some(table) = toml::from_str::<toml::Table>(line)
            .ok()
            .filter(|t| !t.is_empty())
        {
            let value = serde_json::to_value(&table).expect("TOML converts to JSON");
            leaves(&section, &value, &mut keys);
        }
    }
    keys
}

#[test]
fn every_config_key_is_documented_in_the_reference_and_in_config_toml() {
    let keys = config_keys();
    // The walk itself: a renamed field under its serialized name, both signer kinds, a
    // list of tables and an optional table.
    for sample in [
        "clients.match.spiffe",
        "signer.key_dir",
        "signer.jwks_url",
        "server.crl_sources.url",
        "clients.rate_limit.burst",
        "google.deadline",
    ] {
        assert!(keys.contains(sample), "{sample} not among {keys:?}");
    }

    let reference = read("docs/reference/config.md");
    let undocumented: Vec<_> = keys
        .iter()
        .filter(|key| !reference.contains(&format!("| `{key}` |")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "config keys without a row in docs/reference/config.md: {undocumented:?}"
    );

    let shown = config_toml_keys(&read("config.toml"));
    // A key is shown when config.toml sets it or something inside it (`clients.claims`).
    let missing: Vec<_> = keys
        .iter()
        .filter(|key| {
            !shown
                .iter()
                .any(|s| s == *key || s.starts_with(&format!("{key}.")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "config keys neither set nor shown commented in config.toml: {missing:?}"
    );
}

#[test]
fn the_config_reference_documents_no_key_the_parser_refuses() {
    let keys = config_keys();
    let reference = read("docs/reference/config.md");
    let rows: Vec<&str> = reference
        .lines()
        .filter_map(|line| line.strip_prefix("| `")?.split('`').next())
        .collect();
    assert!(rows.len() >= keys.len(), "{rows:?}");
    for row in rows {
        assert!(
            keys.iter()
                .any(|k| k == row || k.starts_with(&format!("{row}."))),
            "docs/reference/config.md documents {row:?}, which the parser does not accept"
        );
    }
}

#[test]
fn every_metric_is_documented_with_its_labels() {
    let metrics = Metrics::new();
    let catalogue = metrics.catalogue();
    // The catalogue covers what is exposed: the unlabelled metrics render at once.
    let rendered = String::from_utf8(metrics.render()).expect("the exposition is UTF-8");
    let exposed: Vec<&str> = rendered
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    assert!(!exposed.is_empty(), "{rendered}");
    for name in &exposed {
        assert!(
            catalogue.iter().any(|(n, _)| n == name),
            "{name} is exposed but not in Metrics::catalogue"
        );
    }

    let reference = read("docs/reference/metrics.md");
    for (name, labels) in &catalogue {
        let row = reference
            .lines()
            .find(|line| line.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("{name} has no row in docs/reference/metrics.md"));
        for label in labels {
            assert!(
                row.contains(&format!("`{label}`")),
                "docs/reference/metrics.md: the row of {name} does not name its label {label:?}"
            );
        }
    }
}

/// Backticked spans of `text` (inline code).
fn code_spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// ARCHITECTURE.md names only what exists: every path it gives, and every file its code map
/// names in a folder's row. A doc that drifts from the code misleads the next reader.
#[test]
fn architecture_md_names_only_files_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = read("ARCHITECTURE.md");
    let mut missing = Vec::new();
    let tops = [
        "src/",
        "tests/",
        "vendor/",
        "examples/",
        "docs/",
        "bench/",
        "fuzz/",
    ];
    for span in code_spans(&text) {
        let is_path =
            tops.iter().any(|top| span.starts_with(top)) && !span.contains(['<', '*', ' ']);
        if is_path && !root.join(span).exists() {
            missing.push(span.to_string());
        }
    }
    // A code-map row whose first cell is a folder: the `name.rs` files it names are in it.
    for row in text.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split(" | ").collect();
        let Some(folder) = code_spans(cells[0]).first().copied() else {
            continue;
        };
        if !folder.ends_with('/') || folder.contains(['<', '*']) {
            continue;
        }
        for name in code_spans(&cells[1..].join(" | ")) {
            let bare = !name.contains(['/', ' ', '<', '*', ':']);
            if bare && name.ends_with(".rs") && !root.join(folder).join(name).exists() {
                missing.push(format!("{folder}{name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names files that do not exist: {missing:?}"
    );
}

/// SECURITY.md cites tests and functions by path (`module::name`): each one exists, as an
/// integration test in tests/it/<module>.rs or an item of a module of src/.
#[test]
fn security_md_cites_only_tests_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = read("SECURITY.md");
    let mut missing = Vec::new();
    for span in code_spans(&text) {
        let parts: Vec<&str> = span.split("::").collect();
        let is_path = parts.len() >= 2
            && parts.iter().all(|p| {
                !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            });
        if !is_path {
            continue;
        }
        let name = parts[parts.len() - 1];
        // A file of a module prefix (src/a/b.rs, src/a/b/mod.rs) or the integration test
        // module tests/it/a.rs defines it.
        let defined = (1..parts.len())
            .rev()
            .flat_map(|k| {
                let modules = parts[..k].join("/");
                [
                    root.join("src").join(format!("{modules}.rs")),
                    root.join("src").join(&modules).join("mod.rs"),
                ]
            })
            .chain([root.join("tests/it").join(format!("{}.rs", parts[0]))])
            .filter_map(|file| std::fs::read_to_string(file).ok())
            .any(|code| {
                code.contains(&format!("fn {name}(")) || code.contains(&format!("fn {name}<"))
            });
        if !defined {
            missing.push(span.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "SECURITY.md cites tests or functions that do not exist: {missing:?}"
    );
}
