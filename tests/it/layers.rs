//! The layers of `src/` run one way, and what must be absent is absent: every `crate::`
//! import of a module is checked against the layer table below (read from the source, as
//! rust-analyzer's architecture tests do). Moving code across layers means changing this
//! table, on purpose.

use std::collections::BTreeMap;
use std::path::Path;

/// Layers, top first. A module may import from its own layer's other modules only where
/// `SAME_LAYER` says so, and from any layer below.
const LAYERS: &[&[&str]] = &[
    &["main"],
    &["cli"],
    &["server", "admin", "device"],
    &["live", "crl_fetch"],
    &["http"],
    &["broker"],
    &["cache", "tls"],
    &["flows"],
    &["claims", "clients"],
    &["signer"],
    &["google", "trust"],
    &["crl", "identity", "proxy", "devpki", "tickets"],
    &[
        "config", "clock", "crypto", "pem", "logging", "metrics", "redact", "console",
    ],
    &["der"],
];

/// Imports within one layer that are part of the design.
const SAME_LAYER: &[(&str, &str)] = &[
    ("server", "admin"),
    ("claims", "clients"),
    ("crl", "pem"),
    // A CRL's issuer is spelt as every distinguished name is (`identity::dn_text`).
    ("crl", "identity"),
];

/// What must never be imported, whatever the layers say (the "absent" invariants of
/// ARCHITECTURE.md).
const ABSENT: &[(&str, &str, &str)] = &[
    ("broker", "http", "the decision knows nothing of HTTP"),
    ("flows", "http", "flows know nothing of HTTP"),
    (
        "flows",
        "broker",
        "flows are called by the broker, never the reverse",
    ),
    (
        "device",
        "server",
        "device code shares nothing with the server side",
    ),
    (
        "device",
        "broker",
        "device code shares nothing with the server side",
    ),
    (
        "device",
        "trust",
        "device code shares nothing with the server side",
    ),
    (
        "device",
        "http",
        "device code shares nothing with the server side",
    ),
    ("trust", "google", "validation never calls out"),
];

/// The top-level module a source file belongs to (`src/google/transport.rs` -> google).
fn module_of(path: &Path) -> String {
    let relative = path.strip_prefix("src").unwrap();
    let first = relative.iter().next().unwrap().to_string_lossy();
    first.trim_end_matches(".rs").replace("lib", "main")
}

/// Every top-level module each module imports through `crate::` (or the library's name).
fn imports() -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(root).unwrap().to_path_buf();
            let module = module_of(&relative);
            let source = std::fs::read_to_string(&path).unwrap();
            // Comments may name any module; only code imports.
            let text: String = source
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for prefix in ["crate::", "token_broker::"] {
                for (at, _) in text.match_indices(prefix) {
                    let rest = &text[at + prefix.len()..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != module {
                        out.entry(module.clone())
                            .or_default()
                            .push((name, relative.display().to_string()));
                    }
                }
            }
        }
    }
    out
}

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|layer| layer.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer of tests/it/layers.rs"))
}

#[test]
fn imports_run_down_the_layers() {
    let mut wrong = Vec::new();
    for (module, used) in imports() {
        for (import, file) in used {
            let (from, to) = (layer_of(&module), layer_of(&import));
            let allowed = to > from || SAME_LAYER.contains(&(module.as_str(), import.as_str()));
            if !allowed {
                wrong.push(format!(
                    "{file}: {module} (layer {from}) imports {import} (layer {to})"
                ));
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn what_must_be_absent_is_absent() {
    let imports = imports();
    let mut wrong = Vec::new();
    for (module, forbidden, why) in ABSENT {
        for (import, file) in imports.get(*module).into_iter().flatten() {
            if import == forbidden {
                wrong.push(format!("{file}: {module} imports {forbidden}: {why}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_table_sees_real_imports() {
    // A table that matches nothing (a path change, a broken scan) would pass everything.
    let imports = imports();
    assert!(imports["broker"].iter().any(|(m, _)| m == "trust"));
    assert!(imports["http"].iter().any(|(m, _)| m == "broker"));
    assert!(imports["main"].iter().any(|(m, _)| m == "cli"));
    assert!(imports["cli"].iter().any(|(m, _)| m == "server"));
}
