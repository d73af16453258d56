//! Memory per entry of the broker's verified-chain cache (`broker::VerifiedChains`, the
//! real type), for `bench/devices.sh`: fills it with `--entries` verdicts keyed by the
//! certificates of a `bench_devices` bundle (each with a counter appended, so entries stay
//! distinct when there are fewer certificates than entries), each holding its own copy of
//! the certificate's parsed identity as the broker's entries do, and prints, as one JSON
//! line, the process's RSS growth per entry.
//!
//! ```sh
//! cargo run --release --example chain_cache_memory -- --devices devices.pem --entries 1000000
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use token_broker::broker::{ChainKeys, VerifiedChains};
use token_broker::identity::Identity;

#[derive(Parser, Debug)]
struct Args {
    /// A bundle of device certificates (keys in it are skipped).
    #[arg(long)]
    devices: PathBuf,
    #[arg(long)]
    entries: usize,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn rss_kb() -> Result<u64, BoxError> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed VmRSS")?
        .parse()?)
}

fn run(args: &Args) -> Result<serde_json::Value, BoxError> {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&args.devices)?.collect::<Result<_, _>>()?;
    if certs.is_empty() {
        return Err("no certificate in the bundle".into());
    }
    let identities = certs
        .iter()
        .map(|cert| Identity::from_der(cert))
        .collect::<Result<Vec<_>, _>>()?;
    let cache = VerifiedChains::new(args.entries);
    let before = rss_kb()?;
    let now = 1_800_000_000;
    let mut leaf = Vec::new();
    for i in 0..args.entries {
        let cert = &certs[i % certs.len()];
        // A distinct leaf hash per entry, for entries beyond the bundle's certificates.
        leaf.clear();
        leaf.extend_from_slice(cert);
        leaf.extend_from_slice(&(i as u64).to_be_bytes());
        let identity = Arc::new(identities[i % certs.len()].clone());
        cache.put(ChainKeys::of(&leaf, &[]), identity, now, now + 3600);
    }
    let held = cache.entries();
    let after = rss_kb()?;
    Ok(serde_json::json!({
        "entries": args.entries,
        "held": held,
        "distinct_certificates": certs.len(),
        "rss_before_kb": before,
        "rss_after_kb": after,
        "bytes_per_entry": (after.saturating_sub(before)) as f64 * 1024.0 / held.max(1) as f64,
    }))
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(line) => println!("{line}"),
        Err(error) => {
            eprintln!("chain_cache_memory: {error}");
            std::process::exit(1);
        }
    }
}
