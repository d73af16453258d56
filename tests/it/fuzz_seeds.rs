//! Replays every committed fuzz seed (`fuzz/seeds/<target>/`) through the fuzz targets'
//! bodies on the stable toolchain, so CI exercises them without nightly or libFuzzer.
//! The bodies live in `fuzz/src/lib.rs`, shared with the `cargo fuzz` drivers.

#[path = "../../fuzz/src/lib.rs"]
mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn seeds_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

/// Runs every seed of one target; fails on a missing or empty seed folder.
fn replay(target: &str) {
    let body = targets::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, body)| *body)
        .unwrap_or_else(|| panic!("no fuzz target {target}"));
    let dir = seeds_dir().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed folder {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "seed folder {} is empty", dir.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).unwrap();
            catch_unwind(AssertUnwindSafe(|| body(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(failed.is_empty(), "seeds failing {target}: {failed:#?}");
}

#[test]
fn every_target_has_seeds_and_every_seed_folder_a_target() {
    let mut folders: Vec<String> = std::fs::read_dir(seeds_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    folders.sort();
    let mut names: Vec<String> = targets::TARGETS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    names.sort();
    assert_eq!(folders, names);
}

#[test]
fn form_seeds() {
    replay("form");
}

#[test]
fn proxy_header_seeds() {
    replay("proxy_header");
}

#[test]
fn identity_seeds() {
    replay("identity");
}

#[test]
fn identity_structured_seeds() {
    replay("identity_structured");
}

#[test]
fn config_seeds() {
    replay("config");
}

#[test]
fn jwt_encode_seeds() {
    replay("jwt_encode");
}
