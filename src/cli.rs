//! The `token-broker` command line: its arguments (clap) and what each command does. The
//! binary only parses and calls [`run`]; `docs/reference/cli.md` is the reference.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::broker::{Broker, Problems};
use crate::clock;
use crate::config::{Config, ConfigError};
use crate::console;
use crate::crl_fetch::{Mode, SourceResult};
use crate::device::agent::AgentConfig;
use crate::device::client::{BrokerClient, CachingClient, ClientError, TokenParams};
use crate::device::credentials::{DeviceCredentials, Pkcs11Options, Source};
use crate::device::token::{self, TokenFormat};
use crate::devpki::{self, DevPkiError};
use crate::live::Live;
use crate::logging::{AuditLog, AuditOpenError, LogFormat};
use crate::metrics::Metrics;
use crate::pem::{self, PemError};
use crate::server::Server;

/// Why a command could not do its work (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}: configuration has problems (run check-config):\n{problems}", path.display())]
    Problems { path: PathBuf, problems: Problems },
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error(transparent)]
    DevPki(#[from] DevPkiError),
    #[error(transparent)]
    TicketKeys(#[from] crate::tickets::TicketKeyError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Audit(#[from] AuditOpenError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot write to standard output: {0}")]
    Stdout(std::io::Error),
}

#[derive(Parser)]
#[command(
    name = "token-broker",
    version,
    about = "mTLS token server: device certificates in, signed tokens out"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        default_value = "config.toml",
        env = "TOKEN_BROKER_CONFIG"
    )]
    pub config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Create a development PKI and signing key, and a commented starting config at
    /// -c/--config (default config.toml) when there is none.
    Init {
        #[arg(long, default_value = "certs/dev")]
        dir: PathBuf,
        /// Overwrite the PKI's existing files (never an existing config).
        #[arg(long)]
        force: bool,
    },
    /// Load and check everything the server would; print the effective config.
    CheckConfig {
        /// Also download every CRL source and say whether the server would admit it (nothing
        /// is kept); exit 1 when one would not be.
        #[arg(long)]
        fetch: bool,
    },
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
    /// CRLs of `[[server.crl_sources]]`.
    #[command(subcommand)]
    Crl(CrlCommand),
    /// Put a new session ticket key first in FILE, keeping the one it replaces (creates FILE).
    RotateTicketKeys {
        /// The file `server.session_ticket_keys` names.
        file: PathBuf,
    },
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

#[derive(Subcommand)]
pub enum CrlCommand {
    /// Download every CRL source now, as the server would, into crl_cache_dir; a running
    /// server enforces what was kept within a second. Exit 1 when one was not admitted.
    Fetch,
}

/// How to reach the broker as this device.
#[derive(clap::Args)]
pub struct DeviceArgs {
    /// Broker URL (its /token endpoint is used).
    #[arg(long, env = "TOKEN_BROKER_URL")]
    pub url: String,
    /// Device certificate: PEM file (leaf first, then intermediates) or a pkcs11: URI.
    #[arg(long, env = "TOKEN_BROKER_CERT", hide_env_values = true)]
    pub cert: PathBuf,
    /// Intermediate CA certificates (PEM) sent after a --cert read from a PKCS#11 token.
    #[arg(long, env = "TOKEN_BROKER_CHAIN")]
    pub chain: Option<PathBuf>,
    /// Device private key: PEM file (not readable by others) or a pkcs11: URI (RFC 7512).
    #[arg(long, env = "TOKEN_BROKER_KEY", hide_env_values = true)]
    pub key: PathBuf,
    /// PKCS#11 module for pkcs11: URIs (default: module-path= of the URI, else p11-kit's proxy).
    #[arg(long, env = "TOKEN_BROKER_PKCS11_MODULE")]
    pub pkcs11_module: Option<PathBuf>,
    /// File holding the token's PIN (else pin-source= of the URI, else TOKEN_BROKER_PKCS11_PIN).
    #[arg(long, env = "TOKEN_BROKER_PKCS11_PIN_FILE")]
    pub pkcs11_pin_file: Option<PathBuf>,
    /// CA certificate(s) to trust for the broker (default: public roots).
    #[arg(long, env = "TOKEN_BROKER_CA")]
    pub ca: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct TokenArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long)]
    pub audience: Option<String>,
    /// Google OAuth scopes (space-separated).
    #[arg(long)]
    pub scope: Option<String>,
    #[arg(long)]
    pub service_account: Option<String>,
    /// Audience of a Google-signed ID token (with --service-account).
    #[arg(long)]
    pub target_audience: Option<String>,
    #[arg(long, value_enum, default_value_t = TokenFormat::Json)]
    pub format: TokenFormat,
    /// Keep the token in this file (mode 0600) and reuse it until shortly before it expires.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Removed (it needed a patched rustls): refused with the reason, never ignored.
    #[arg(long, hide = true, value_name = "FILE")]
    pub session_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Address to serve on; point GCE_METADATA_HOST at it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Allow a non-loopback --listen address.
    #[arg(long)]
    pub allow_remote: bool,
    /// The service account whose tokens the agent serves.
    #[arg(long)]
    pub service_account: String,
    /// Default scopes (comma-separated).
    #[arg(
        long,
        default_value = crate::google::CLOUD_PLATFORM,
        value_delimiter = ','
    )]
    pub scopes: Vec<String>,
    /// Served as `project/project-id` (not defined when absent).
    #[arg(long)]
    pub project_id: Option<String>,
    /// Served as `project/numeric-project-id` (not defined when absent).
    #[arg(long)]
    pub numeric_project_id: Option<u64>,
    /// Served as `instance/id` (default: a number derived from the certificate's SPIFFE ID or subject).
    #[arg(long)]
    pub instance_id: Option<u64>,
    /// Served as `instance/hostname` (default: this machine's host name).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Zone name, served as `instance/zone` = projects/NUMBER/zones/ZONE (with --numeric-project-id).
    #[arg(long, default_value = "on-premises")]
    pub zone: String,
    /// Serve only this local user (name or uid; repeatable). Default: every local user, as
    /// GCE's metadata server does; see SECURITY.md.
    #[arg(long = "allow-user", value_name = "USER")]
    pub allow_users: Vec<String>,
}

impl Cli {
    /// Serving commands buffer their logs (an audit line per token); others write through.
    pub fn long_running(&self) -> bool {
        matches!(
            self.command,
            None | Some(Command::Serve) | Some(Command::Agent(_))
        )
    }
}

/// Runs the parsed command; the exit code says how it ended (see `docs/reference/cli.md`).
/// `audit` is where `serve` sends audit lines when the config names a file.
pub fn run(cli: Cli, audit: Arc<AuditLog>) -> Result<ExitCode, CliError> {
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.config, audit),
        Command::RotateTicketKeys { file } => {
            crate::tickets::rotate(&file)?;
            out(&format!(
                "rotated session ticket keys in {}",
                file.display()
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Init { dir, force } => init(&dir, &cli.config, force),
        Command::CheckConfig { fetch } => {
            let config = Config::load(&cli.config)?;
            let broker = match Broker::build(config, Arc::new(Metrics::new())) {
                Ok(broker) => broker,
                Err(problems) => return Ok(report_problems(&cli.config, &problems.0)),
            };
            let report = broker
                .report(clock::unix_now())
                .map_err(|e| CliError::Usage(e.to_string()))?;
            console::print(&report).map_err(CliError::Stdout)?;
            if !fetch {
                return Ok(ExitCode::SUCCESS);
            }
            let results = fetch_crl_sources(Arc::new(broker), Mode::Check)?;
            print_fetches(results, "# CRL source ", " (would be admitted)")
        }
        Command::VerifyCert { chain, at } => {
            let config = Config::load(&cli.config)?;
            let broker = Broker::build(config, Arc::new(Metrics::new())).map_err(|problems| {
                CliError::Problems {
                    path: cli.config.clone(),
                    problems,
                }
            })?;
            let certs = pem::certificates(&chain)?;
            let at = match at {
                Some(text) => text
                    .parse::<jiff::Timestamp>()
                    .map_err(|e| {
                        CliError::Usage(format!("--at {text:?} is not an RFC 3339 time: {e}"))
                    })?
                    .as_second(),
                None => clock::unix_now(),
            };
            let decision = broker.explain(&certs, clock::at_unix(at));
            out(&json(&decision))?;
            // Exit 2 for a refusal so scripts can tell it from an error (1).
            Ok(if decision.accepted {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
        Command::Crl(CrlCommand::Fetch) => crl_fetch(&cli.config),
        Command::WifSetup { project_id } => wif_setup(&cli.config, &project_id),
        Command::Token(args) => Ok(token(args)),
        Command::Agent(args) => agent(args),
        Command::Jwks => {
            let config = Config::load(&cli.config)?;
            let broker = Broker::build(config, Arc::new(Metrics::new())).map_err(|problems| {
                CliError::Problems {
                    path: cli.config.clone(),
                    problems,
                }
            })?;
            match (broker.signer().jwks(), broker.signer().jwks_uri()) {
                (Some(jwks), _) => out(&json(jwks))?,
                (None, Some(uri)) => {
                    return Err(CliError::Usage(format!(
                        "the {} signer's keys are published by Google at {uri}",
                        broker.signer().kind()
                    )))
                }
                (None, None) => return Err(CliError::Usage("the signer publishes no keys".into())),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `init`: the development PKI, and a starting config at `config` unless one is there;
/// prints what it wrote and the next commands.
fn init(dir: &Path, config: &Path, force: bool) -> Result<ExitCode, CliError> {
    let (pki, wrote_config) = devpki::init_with_config(dir, config, force)?;
    out(&format!("development PKI written to {}", pki.dir.display()))?;
    if !wrote_config {
        out(&format!(
            "{} exists and was left as it is (a starting config is written only where there is none)",
            config.display()
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let url = Config::load(config)?.issuer.endpoint("/token");
    out(&format!(
        "starting config written to {config} (development only; for production: README.md, \"Pointing it at your PKI\")\n\n\
         Next, run the server:\n  token-broker --config {config} serve\n\
         then, in another terminal, get a token:\n  {curl}",
        config = config.display(),
        curl = pki.curl_command(&url)
    ))?;
    Ok(ExitCode::SUCCESS)
}

/// One line per CRL source, `{prefix}URL: result`, then `admitted` or why it was refused;
/// exit 1 when one was refused.
fn print_fetches(
    results: Vec<SourceResult>,
    prefix: &str,
    admitted: &str,
) -> Result<ExitCode, CliError> {
    let mut refused = false;
    for (url, result) in results {
        match result {
            Ok(fetched) => out(&format!("{prefix}{url}: {}{admitted}", fetched.label()))?,
            Err(error) => {
                refused = true;
                out(&format!("{prefix}{url}: {}: {error}", error.label()))?;
            }
        }
    }
    Ok(if refused {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn fetch_crl_sources(broker: Arc<Broker>, mode: Mode) -> Result<Vec<SourceResult>, CliError> {
    Ok(runtime()?.block_on(crate::crl_fetch::fetch_all(&broker, mode)))
}

/// `crl fetch`: one line per source, `URL: result` and why when it was not admitted.
fn crl_fetch(path: &Path) -> Result<ExitCode, CliError> {
    let config = Config::load(path)?;
    let broker =
        Broker::build(config, Arc::new(Metrics::new())).map_err(|problems| CliError::Problems {
            path: path.to_owned(),
            problems,
        })?;
    if broker.config().server.crl_sources.is_empty() {
        return Err(CliError::Usage(
            "no [[server.crl_sources]] in the config: nothing to fetch".into(),
        ));
    }
    let results = fetch_crl_sources(Arc::new(broker), Mode::Keep)?;
    print_fetches(results, "", "")
}

fn device_credentials(device: &DeviceArgs) -> Result<DeviceCredentials, ClientError> {
    Ok(DeviceCredentials::new(
        Source::parse(&device.cert)?,
        device.chain.clone(),
        Source::parse(&device.key)?,
        Pkcs11Options::from_env(device.pkcs11_module.clone(), device.pkcs11_pin_file.clone()),
    ))
}

fn device_client(device: &DeviceArgs) -> Result<BrokerClient, ClientError> {
    BrokerClient::with_credentials(
        &device.url,
        device_credentials(device)?,
        device.ca.as_deref(),
    )
}

/// What `token --cache` binds a token to for these arguments.
fn cache_binding(device: &DeviceArgs) -> Result<String, String> {
    let stamp = device_credentials(device)
        .and_then(|credentials| credentials.certificate_stamp())
        .map_err(|e| e.to_string())?;
    crate::device::client::cache_binding(&device.url, device.ca.as_deref(), &stamp)
}

/// `token`: prints the token; errors go to stderr (or stdout as AIP-4117 for libraries).
fn token(args: TokenArgs) -> ExitCode {
    use crate::device::executable;
    let in_token =
        |value: &Path| crate::device::pkcs11::Pkcs11Uri::is_uri(&value.to_string_lossy());
    if args.format == TokenFormat::Executable
        && executable::should_capture_output(
            in_token(&args.device.key) || in_token(&args.device.cert),
        )
    {
        return ExitCode::from(executable::run_with_output_captured());
    }
    let params = TokenParams {
        audience: args.audience,
        scope: args.scope,
        service_account: args.service_account,
        target_audience: args.target_audience,
    };
    if args.session_file.is_some() {
        let removed = ClientError::Local(token::SESSION_FILE_REMOVED.into());
        return ExitCode::from(token::fail(&removed, args.format));
    }
    let code = token::token_command(
        || device_client(&args.device),
        || cache_binding(&args.device),
        &params,
        args.cache.as_deref(),
        args.format,
        &crate::device::executable::ExecutableEnv::from_process(),
    );
    ExitCode::from(code)
}

fn agent(args: AgentArgs) -> Result<ExitCode, CliError> {
    crate::device::agent::check_listen(args.listen, args.allow_remote).map_err(CliError::Usage)?;
    let client = device_client(&args.device)?;
    let instance_id = match args.instance_id {
        Some(id) => id,
        None => crate::device::agent::instance_id_of(&client.identity()?),
    };
    let config = AgentConfig {
        service_account: args.service_account,
        scopes: args.scopes,
        project_id: args.project_id.filter(|id| !id.is_empty()),
        numeric_project_id: args.numeric_project_id,
        instance_id,
        hostname: args
            .hostname
            .unwrap_or_else(crate::device::agent::system_hostname),
        zone: args.zone,
        allowed_uids: args
            .allow_users
            .iter()
            .map(|user| crate::device::local_peer::uid_named(user))
            .collect::<Result<_, _>>()
            .map_err(CliError::Usage)?,
    };
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|source| CliError::Listen { address: args.listen.to_string(), source })?;
        if let Ok(address) = listener.local_addr() {
            tracing::info!(listen = %address, "metadata agent serving; set GCE_METADATA_HOST to this address");
        }
        tokio::select! {
            _ = crate::device::agent::serve(listener, config, CachingClient::new(client)) => {}
            _ = crate::server::shutdown_signal() => {}
        }
        Ok::<_, CliError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn wif_setup(config_path: &Path, project_id: &str) -> Result<ExitCode, CliError> {
    let config = Config::load(config_path)?;
    let setup = crate::google::setup::script(&config, project_id).ok_or_else(|| {
        CliError::Usage(format!("{}: no [google] section", config_path.display()))
    })?;
    for warning in &setup.warnings {
        console::eprintln(&format!("warning: {warning}"));
    }
    out(&setup.script)?;
    Ok(ExitCode::SUCCESS)
}

fn report_problems(config: &Path, problems: &[String]) -> ExitCode {
    for problem in problems {
        console::eprintln(&format!("error: {}: {problem}", config.display()));
    }
    console::eprintln(&format!("{} problem(s) found", problems.len()));
    ExitCode::FAILURE
}

fn serve(config_path: &Path, audit: Arc<AuditLog>) -> Result<ExitCode, CliError> {
    let config = Config::load(config_path)?;
    devpki::prepare(&config)?;
    let broker = match Broker::build(config, Arc::new(Metrics::new())) {
        Ok(broker) => Arc::new(broker),
        Err(problems) => return Ok(report_problems(config_path, &problems.0)),
    };
    audit.open_at(broker.config().audit_path().as_deref())?;
    runtime()?.block_on(async {
        let live = Live::new(broker.clone(), Some(config_path.to_path_buf()));
        let live = Arc::new(live.with_audit_log(audit));
        let server = Server::bind(live)
            .await
            .map_err(|source| CliError::Listen {
                address: broker.config().server.listen.to_string(),
                source,
            })?;
        if let Ok(address) = server.local_addr() {
            tracing::info!(
                listen = %address,
                admin = ?server.admin_addr(),
                issuer = %broker.config().issuer.url,
                "token-broker serving"
            );
        }
        // On a worker thread, not this one: the accept loop parked here would need a
        // wakeup from the worker thread that owns the I/O driver for every connection.
        if let Err(join) = tokio::spawn(server.run(crate::server::shutdown_signal())).await {
            if join.is_panic() {
                std::panic::resume_unwind(join.into_panic());
            }
        }
        Ok::<_, CliError>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Runtime::new().map_err(CliError::Runtime)
}

/// A line on stdout; a reader that went away is no error (`console`).
fn out(line: &str) -> Result<(), CliError> {
    console::println(line).map_err(CliError::Stdout)
}

/// Pretty JSON of what the broker itself built (serializing it cannot fail).
fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
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
