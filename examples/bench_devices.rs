//! Many distinct device certificates for `bench/devices.sh`: `--count` P-256 device
//! certificates (as `token-broker init` makes its one, `devpki::issue_device`) signed by the
//! development CA in `--pki` (made by `token-broker init`), written as one PEM bundle:
//! each device's certificate followed by its PKCS#8 key. `examples/loadgen.rs --devices`
//! reads it.
//!
//! ```sh
//! cargo run --release --example bench_devices -- --pki PKI_DIR --count 100000 --out devices.pem
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use rcgen::{Issuer, KeyPair};
use token_broker::devpki;

#[derive(Parser, Debug)]
struct Args {
    /// A `token-broker init` folder (ca.pem, ca-key.pem).
    #[arg(long)]
    pki: PathBuf,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    out: PathBuf,
    /// Generating threads (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn run(args: &Args) -> Result<(), BoxError> {
    let started = Instant::now();
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(args.pki.join("ca-key.pem"))?)?;
    let ca_pem = std::fs::read_to_string(args.pki.join("ca.pem"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let chunks: Vec<Result<String, BoxError>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let issuer = &issuer;
                scope.spawn(move || -> Result<String, BoxError> {
                    let mut pem = String::new();
                    for i in (t..args.count).step_by(threads) {
                        let (cert, key) =
                            devpki::issue_device(issuer, &format!("bench-device-{i:07}"))?;
                        pem.push_str(&cert.pem());
                        pem.push_str(&key.serialize_pem());
                    }
                    Ok(pem)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err("generator thread panicked".into()))
            })
            .collect()
    });
    let tmp = args.out.with_extension("partial");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for chunk in chunks {
        file.write_all(chunk?.as_bytes())?;
    }
    file.flush()?;
    drop(file);
    std::fs::rename(&tmp, &args.out)?;
    eprintln!(
        "bench_devices: {} devices in {:.1} s ({} threads) -> {}",
        args.count,
        started.elapsed().as_secs_f64(),
        threads,
        args.out.display()
    );
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(error) = run(&args) {
        eprintln!("bench_devices: {error}");
        std::process::exit(1);
    }
}
