//! The `token-broker` command line. Thin: every command is a call into the library.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use token_broker::broker::Broker;
use token_broker::config::Config;
use token_broker::device::agent::AgentConfig;
use token_broker::device::client::{
    self, BrokerClient, CachingClient, ClientError, TokenFormat, TokenParams,
};
use token_broker::live::Live;
use token_broker::logging::LogFormat;
use token_broker::metrics::Metrics;
use token_broker::server::Server;
use token_broker::{clock, devpki, pem};

#[derive(Parser)]
#[command(
    name = "token-broker",
    version,
    about = "mTLS token server: device certificates in, signed tokens out"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        default_value = "config.toml",
        env = "TOKEN_BROKER_CONFIG"
    )]
    config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Create a development PKI and signing key.
    Init {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Load and check everything the server would; print the effective config.
    CheckConfig,
    /// Run the server's certificate validation and rule matching on a PEM chain.
    VerifyCert {
        /// PEM file: the client certificate first, then any intermediates.
        chain: PathBuf,
        /// Validate at this time (RFC 3339) instead of now.
        #[arg(long)]
        at: Option<String>,
    },
    /// Print the public JWKS.
    Jwks,
    /// Device side: fetch a token from a broker with this device's certificate.
    Token(TokenArgs),
    /// Device side: serve the GCE metadata-server subset Google libraries use, from the broker.
    Agent(AgentArgs),
    /// Print the gcloud commands that connect this issuer to Google Workload Identity Federation.
    WifSetup {
        /// Project ID for gcloud's --project (the config holds the project number).
        #[arg(long, default_value = "PROJECT_ID")]
        project_id: String,
    },
}

/// How to reach the broker as this device.
#[derive(clap::Args)]
struct DeviceArgs {
    /// Broker URL (its /token endpoint is used).
    #[arg(long, env = "TOKEN_BROKER_URL")]
    url: String,
    /// Device certificate (PEM, leaf first, then intermediates).
    #[arg(long, env = "TOKEN_BROKER_CERT")]
    cert: PathBuf,
    /// Device private key (PEM; must not be readable by others).
    #[arg(long, env = "TOKEN_BROKER_KEY")]
    key: PathBuf,
    /// CA certificate(s) to trust for the broker (default: public roots).
    #[arg(long, env = "TOKEN_BROKER_CA")]
    ca: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TokenArgs {
    #[command(flatten)]
    device: DeviceArgs,
    #[arg(long)]
    audience: Option<String>,
    /// Google OAuth scopes (space-separated).
    #[arg(long)]
    scope: Option<String>,
    #[arg(long)]
    service_account: Option<String>,
    /// Audience of a Google-signed ID token (with --service-account).
    #[arg(long)]
    target_audience: Option<String>,
    #[arg(long, value_enum, default_value_t = TokenFormat::Json)]
    format: TokenFormat,
    /// Keep the token in this file (mode 0600) and reuse it until shortly before it expires.
    #[arg(long)]
    cache: Option<PathBuf>,
}

#[derive(clap::Args)]
struct AgentArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// Address to serve on; point GCE_METADATA_HOST at it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Allow a non-loopback --listen address.
    #[arg(long)]
    allow_remote: bool,
    /// The service account whose tokens the agent serves.
    #[arg(long)]
    service_account: String,
    /// Default scopes (comma-separated).
    #[arg(
        long,
        default_value = token_broker::google::CLOUD_PLATFORM,
        value_delimiter = ','
    )]
    scopes: Vec<String>,
    #[arg(long, default_value = "")]
    project_id: String,
    #[arg(long, default_value = "")]
    numeric_project_id: String,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    let long_running = matches!(
        cli.command,
        None | Some(Command::Serve) | Some(Command::Agent(_))
    );
    let logs = token_broker::logging::init(cli.log_format, long_running);
    let result = {
        let _flush = logs.flush_on_drop();
        run(cli)
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// clap exits 2 on a usage error, which `verify-cert` and `token` use for "refused": a
/// usage error is a local problem (1). `--help` and `--version` succeed (0).
fn usage_error(error: &clap::Error) -> ExitCode {
    let _ = error.print();
    if error.use_stderr() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.config),
        Command::Init { dir, force } => {
            let pki = devpki::init(&dir, force)?;
            println!("development PKI written to {}", pki.dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig => {
            let config = Config::load(&cli.config)?;
            let broker = match Broker::build(config, Arc::new(Metrics::new())) {
                Ok(broker) => broker,
                Err(problems) => return Ok(report_problems(&cli.config, &problems.0)),
            };
            print!("{}", broker.report(clock::unix_now())?);
            Ok(ExitCode::SUCCESS)
        }
        Command::VerifyCert { chain, at } => {
            let config = Config::load(&cli.config)?;
            let broker = Broker::build(config, Arc::new(Metrics::new())).map_err(|p| {
                anyhow::anyhow!(
                    "{}: configuration has problems (run check-config):\n{p}",
                    cli.config.display()
                )
            })?;
            let certs = pem::certificates(&chain)?;
            let at = match at {
                Some(text) => text
                    .parse::<jiff::Timestamp>()
                    .with_context(|| format!("--at {text:?} is not an RFC 3339 time"))?
                    .as_second(),
                None => token_broker::clock::unix_now(),
            };
            let decision = broker.explain(&certs, clock::at_unix(at));
            println!("{}", serde_json::to_string_pretty(&decision)?);
            // Exit 2 for a refusal so scripts can tell it from an error (1).
            Ok(if decision.accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::WifSetup { project_id } => wif_setup(&cli.config, &project_id),
        Command::Token(args) => Ok(token(args)),
        Command::Agent(args) => agent(args),
        Command::Jwks => {
            let config = Config::load(&cli.config)?;
            let broker = Broker::build(config, Arc::new(Metrics::new())).map_err(|p| {
                anyhow::anyhow!(
                    "{}: configuration has problems (run check-config):\n{p}",
                    cli.config.display()
                )
            })?;
            match (broker.signer().jwks(), broker.signer().jwks_uri()) {
                (Some(jwks), _) => println!("{}", serde_json::to_string_pretty(jwks)?),
                (None, Some(uri)) => anyhow::bail!(
                    "the {} signer's keys are published by Google at {uri}",
                    broker.signer().kind()
                ),
                (None, None) => anyhow::bail!("the signer publishes no keys"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn device_client(device: &DeviceArgs) -> Result<BrokerClient, ClientError> {
    BrokerClient::new(&device.url, &device.cert, &device.key, device.ca.as_deref())
}

/// `token`: prints the token; errors go to stderr (or stdout as AIP-4117 for libraries).
fn token(args: TokenArgs) -> ExitCode {
    let params = TokenParams {
        audience: args.audience,
        scope: args.scope,
        service_account: args.service_account,
        target_audience: args.target_audience,
    };
    let code = client::token_command(
        || device_client(&args.device),
        &params,
        args.cache.as_deref(),
        args.format,
    );
    ExitCode::from(code)
}

fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    token_broker::device::agent::check_listen(args.listen, args.allow_remote)
        .map_err(anyhow::Error::msg)?;
    let client = device_client(&args.device)?;
    let config = AgentConfig {
        service_account: args.service_account,
        scopes: args.scopes,
        project_id: args.project_id,
        numeric_project_id: args.numeric_project_id,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(listen = %listener.local_addr()?, "metadata agent serving; set GCE_METADATA_HOST to this address");
        tokio::select! {
            _ = token_broker::device::agent::serve(listener, config, CachingClient::new(client)) => {}
            _ = token_broker::server::shutdown_signal() => {}
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn wif_setup(config_path: &Path, project_id: &str) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let script = token_broker::google::setup::script(&config, project_id)
        .with_context(|| format!("{}: no [google] section", config_path.display()))?;
    println!("{script}");
    Ok(ExitCode::SUCCESS)
}

fn report_problems(config: &Path, problems: &[String]) -> ExitCode {
    for problem in problems {
        eprintln!("error: {}: {problem}", config.display());
    }
    eprintln!("{} problem(s) found", problems.len());
    ExitCode::FAILURE
}

fn serve(config_path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    devpki::prepare(&config)?;
    let broker = match Broker::build(config, Arc::new(Metrics::new())) {
        Ok(broker) => Arc::new(broker),
        Err(problems) => return Ok(report_problems(config_path, &problems.0)),
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let live = Arc::new(Live::new(broker.clone(), Some(config_path.to_path_buf())));
        let server = Server::bind(live)
            .await
            .with_context(|| format!("cannot listen on {}", broker.config().server.listen))?;
        tracing::info!(
            listen = %server.local_addr()?,
            admin = ?server.admin_addr(),
            issuer = %broker.config().issuer.url,
            "token-broker serving"
        );
        server.run(token_broker::server::shutdown_signal()).await;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn serve_is_the_default_command() {
        use clap::Parser;
        let cli = super::Cli::try_parse_from(["token-broker", "-c", "x.toml"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.config, std::path::PathBuf::from("x.toml"));
    }
}
