//! A huge CRL, measured through the broker's own loading code (`bench/crl.sh`, issue 16).
//!
//! ```sh
//! cargo build --release --example crl_scale
//! B=target/release/examples/crl_scale
//! $B gen --dir target/bench-crl --count 1000000        # dev PKI + a CRL of 1M serials (cached)
//! $B load --dir target/bench-crl --count 1000000       # load time, RSS held, cost per request
//! $B lookup --dir target/bench-crl --count 1000000     # revocation lookups alone
//! ```
//!
//! `gen` writes `DIR/pki/` (the dev PKI of `token-broker init`) once, and
//! `DIR/crl-<count>-v<version>.crl` (DER, signed by the dev CA, every entry with a reason
//! code, serials 16 random bytes as CAs draw them) unless it exists. Versions differ only in
//! cRLNumber and thisUpdate, so a reload test can swap them.
//!
//! `load` loads the bundle and the CRL with `TrustStore::load` (what a start or a reload
//! runs) and prints one JSON line: load time, the heap bytes the store holds (counted by
//! the allocator: what the CRL keeps, without the parse's freed buffers that the allocator
//! may keep resident), VmRSS before, after and after dropping the store, VmHWM, and the server CPU of `TrustStore::verify` for the dev device certificate
//! (not revoked, so every entry's CA is checked) against a store with an empty CRL, in
//! alternating rounds.
//!
//! `lookup` times revocation lookups alone, half hits, half misses, in random order (so the
//! cache holds little of a big table), the probes back to back (a request's serial is at
//! hand): `Crl::is_revoked`, the broker's table, and webpki's own `OwnedCertRevocationList`
//! (what the broker held before).

use std::alloc::System;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::{Duration, OffsetDateTime};
use token_broker::config::RevocationPolicy;
use token_broker::identity::Identity;
use token_broker::trust::TrustStore;

type Error = Box<dyn std::error::Error>;

/// Counts the heap bytes in use, so that what a loaded CRL holds is measured apart from the
/// allocator's retained pages (RSS at 10,000 entries moved by 40 B per entry with them).
#[global_allocator]
static HEAP: cap::Cap<System> = cap::Cap::new(System, usize::MAX);

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let dir = PathBuf::from(value("--dir").unwrap_or_else(|| "target/bench-crl".into()));
    let count: usize = value("--count").unwrap_or_else(|| "10000".into()).parse()?;
    let version: u64 = value("--version").unwrap_or_else(|| "1".into()).parse()?;
    let rounds: usize = value("--rounds").unwrap_or_else(|| "7".into()).parse()?;
    match args.first().map(String::as_str) {
        Some("gen") => {
            let path = generate(&dir, count, version)?;
            println!("{}", path.display());
            Ok(())
        }
        Some("load") => load(&dir, count, rounds),
        Some("lookup") => lookup(&dir, count),
        _ => Err(
            "usage: crl_scale gen|load|lookup --dir DIR --count N [--version K] [--rounds R]"
                .into(),
        ),
    }
}

fn crl_path(dir: &Path, count: usize, version: u64) -> PathBuf {
    dir.join(format!("crl-{count}-v{version}.crl"))
}

/// splitmix64: reproducible serials without a dependency.
struct Random(u64);
impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn serial(&mut self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.next().to_be_bytes());
        bytes[8..].copy_from_slice(&self.next().to_be_bytes());
        bytes
    }
}

fn generate(dir: &Path, count: usize, version: u64) -> Result<PathBuf, Error> {
    let pki = dir.join("pki");
    if !pki.join("ca.pem").exists() {
        token_broker::devpki::init(&pki, false)?;
    }
    let path = crl_path(dir, count, version);
    if path.exists() {
        return Ok(path);
    }
    let key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca-key.pem"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.join("ca.pem"))?, key)?;
    let now = OffsetDateTime::now_utc();
    let mut random = Random(count as u64);
    let revoked_certs = (0..count)
        .map(|i| RevokedCertParams {
            serial_number: SerialNumber::from_slice(&random.serial()),
            revocation_time: now - Duration::seconds(i as i64),
            reason_code: Some(RevocationReason::KeyCompromise),
            invalidity_date: None,
        })
        .collect();
    let crl = CertificateRevocationListParams {
        this_update: now - Duration::hours(1) + Duration::seconds(version as i64),
        next_update: now + Duration::days(365),
        crl_number: SerialNumber::from(version),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    let partial = path.with_extension("partial");
    std::fs::write(&partial, crl.der().as_ref())?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// VmRSS and VmHWM of this process, in KiB.
fn memory() -> Result<(u64, u64), Error> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| format!("no {name} in /proc/self/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

fn store(dir: &Path, crl: &Path) -> Result<TrustStore, Error> {
    let crls = token_broker::pem::crls(crl)?;
    Ok(TrustStore::load(
        &dir.join("pki/ca.pem"),
        crls,
        Vec::new(),
        &[],
        &[],
        RevocationPolicy::Require,
    )?)
}

fn load(dir: &Path, count: usize, rounds: usize) -> Result<(), Error> {
    let path = crl_path(dir, count, 1);
    let file_bytes = std::fs::metadata(&path)?.len();
    let device: Vec<CertificateDer<'static>> =
        token_broker::pem::certificates(&dir.join("pki/device.pem"))?;
    let identity = Identity::from_der(&device[0])?;
    let empty = store(dir, &dir.join("pki/ca.crl.pem"))?;
    let (rss_before, _) = memory()?;
    let heap_before = HEAP.allocated();
    let started = Instant::now();
    let big = store(dir, &path)?;
    let load_seconds = started.elapsed().as_secs_f64();
    let heap_held = HEAP.allocated().saturating_sub(heap_before);
    let (rss_loaded, hwm) = memory()?;

    // Per request: the same verification against the empty and the big CRL, alternately.
    let per_round = 2000;
    let mut ratios = Vec::new();
    let mut differences = Vec::new();
    let time = |store: &TrustStore| -> Result<f64, Error> {
        let started = Instant::now();
        for _ in 0..per_round {
            store.verify(&device, &identity, UnixTime::now())?;
        }
        let wall = started.elapsed().as_secs_f64();
        Ok(wall / per_round as f64 * 1e6)
    };
    let mut empty_us = Vec::new();
    let mut big_us = Vec::new();
    for _ in 0..rounds {
        let a = time(&empty)?;
        let b = time(&big)?;
        empty_us.push(a);
        big_us.push(b);
        ratios.push(b / a);
        differences.push(b - a);
    }
    drop(big);
    let (rss_dropped, _) = memory()?;
    println!(
        "{{\"count\":{count},\"file_bytes\":{file_bytes},\"load_s\":{load_seconds:.4},\"heap_held_bytes\":{heap_held},\"heap_held_beyond_file_per_entry\":{:.1},\"rss_before_kib\":{rss_before},\"rss_loaded_kib\":{rss_loaded},\"rss_dropped_kib\":{rss_dropped},\"hwm_kib\":{hwm},\"held_bytes_per_entry\":{:.1},\"held_beyond_file_per_entry\":{:.1},\"verify_us_empty_median\":{:.2},\"verify_us_big_median\":{:.2},\"verify_diff_us_median\":{:.2},\"verify_diff_us\":{:?},\"verify_ratio_median\":{:.4}}}",
        (heap_held as f64 - file_bytes as f64) / count as f64,
        (rss_loaded as f64 - rss_before as f64) * 1024.0 / count as f64,
        ((rss_loaded as f64 - rss_before as f64) * 1024.0 - file_bytes as f64) / count as f64,
        median(&empty_us),
        median(&big_us),
        median(&differences),
        differences.iter().map(|d| (d * 100.0).round() / 100.0).collect::<Vec<_>>(),
        median(&ratios),
    );
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Serials of the CRL as webpki reads them (INTEGER contents), and as many that are not in it.
/// Probes laid out back to back in their (random) order, so that reading the next serial
/// is not itself a cache miss: a request's serial is at hand, just parsed from its
/// certificate, and only the table's misses are the lookup's.
struct Probes {
    bytes: Vec<u8>,
    ends: Vec<usize>,
}

impl Probes {
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts
            .zip(self.ends.iter())
            .map(|(start, &end)| &self.bytes[start..end])
    }

    fn len(&self) -> usize {
        self.ends.len()
    }
}

fn probes(der: &[u8], count: usize) -> Result<Probes, Error> {
    let list = webpki::BorrowedCertRevocationList::from_der(der)?;
    let mut revoked = Vec::with_capacity(count);
    for entry in &list {
        revoked.push(entry?.serial_number.to_vec());
    }
    let mut random = Random(7);
    let mut probes: Vec<Vec<u8>> = Vec::with_capacity(2 * revoked.len());
    for serial in revoked {
        let mut miss = serial.clone();
        let last = miss.len() - 1;
        miss[last] ^= 0x5a;
        probes.push(serial);
        probes.push(miss);
    }
    for i in (1..probes.len()).rev() {
        probes.swap(i, (random.next() % (i as u64 + 1)) as usize);
    }
    let mut flat = Probes {
        bytes: Vec::with_capacity(probes.iter().map(Vec::len).sum()),
        ends: Vec::with_capacity(probes.len()),
    };
    for probe in probes {
        flat.bytes.extend_from_slice(&probe);
        flat.ends.push(flat.bytes.len());
    }
    Ok(flat)
}

fn lookup(dir: &Path, count: usize) -> Result<(), Error> {
    let der = std::fs::read(crl_path(dir, count, 1))?;
    let probes = probes(&der, count)?;
    let timed = |found: &dyn Fn(&[u8]) -> bool| {
        let started = Instant::now();
        let hits = probes.iter().filter(|p| found(p)).count();
        (
            started.elapsed().as_secs_f64() * 1e9 / probes.len() as f64,
            hits,
        )
    };
    let crl = token_broker::crl::Crl::parse(&der, "bench".into(), false)?;
    let (broker_ns, broker_hits) = timed(&|serial: &[u8]| crl.is_revoked(serial));
    drop(crl);
    // What the broker held before beside the DER, and parsed at each load: webpki's
    // owned list (a map of owned entries and a copy of the signed part) and x509-parser's
    // structures (dropped after the load).
    let (rss_before, _) = memory()?;
    let started = Instant::now();
    let webpki_list = webpki::OwnedCertRevocationList::from_der(&der)?;
    let webpki_parse_s = started.elapsed().as_secs_f64();
    let (rss_webpki, _) = memory()?;
    let started = Instant::now();
    let parsed = x509_parser::parse_x509_crl(&der).map_err(|e| e.to_string())?;
    let x509_parse_s = started.elapsed().as_secs_f64();
    let (rss_x509, _) = memory()?;
    drop(parsed);
    let webpki_list = webpki::CertRevocationList::from(webpki_list);
    let webpki_lookup = |serial: &[u8]| matches!(webpki_list.find_serial(serial), Ok(Some(_)));
    let (webpki_ns, webpki_hits) = timed(&webpki_lookup);
    println!(
        "{{\"count\":{count},\"lookups\":{},\"broker_ns\":{broker_ns:.1},\"broker_hits\":{broker_hits},\"webpki_ns\":{webpki_ns:.1},\"webpki_hits\":{webpki_hits},\"webpki_owned_parse_s\":{webpki_parse_s:.4},\"webpki_owned_held_bytes_per_entry\":{:.1},\"x509_parser_parse_s\":{x509_parse_s:.4},\"x509_parser_bytes_per_entry\":{:.1}}}",
        probes.len(),
        (rss_webpki as f64 - rss_before as f64) * 1024.0 / count as f64,
        (rss_x509 as f64 - rss_webpki as f64) * 1024.0 / count as f64,
    );
    Ok(())
}
