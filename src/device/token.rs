//! The `token` command: a token from the cache file while it is fresh, else from the broker,
//! printed as JSON, raw, or as Google's executable-source response (with its `output_file`).
//! It sits above `client` (the broker and the cache file) and `executable` (the contract).

use std::path::Path;

use serde_json::Value;

use crate::console;

use crate::device::client::{BrokerClient, ClientError, Token, TokenCacheFile, TokenParams};
use crate::device::executable::{self, ExecutableEnv};

/// How `token` prints what it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TokenFormat {
    /// The broker's JSON answer.
    Json,
    /// The access token alone.
    Raw,
    /// AIP-4117 executable-sourced credential response (for Google client libraries).
    Executable,
}

/// `token-broker token`: the cached token while it is fresh, else a new one from the broker
/// (then kept in `cache`), printed in `format`; errors go to stderr, and to stdout as the
/// executable-source contract's error for libraries. With `--format executable`, `env` (the
/// library's variables) completes the request and names an `output_file` that receives the
/// response too. Returns the process's exit code.
pub fn token_command(
    client: impl FnOnce() -> Result<BrokerClient, ClientError>,
    binding: impl FnOnce() -> Result<String, String>,
    params: &TokenParams,
    cache: Option<&Path>,
    format: TokenFormat,
    env: &ExecutableEnv,
) -> u8 {
    let printed = match obtain(client, binding, params.clone(), cache, format, env) {
        Ok((token, response)) => match format {
            TokenFormat::Json => console::println(&token.to_json().to_string()),
            TokenFormat::Raw => console::println(&token.access_token),
            TokenFormat::Executable => executable::print_response(&response),
        },
        Err(error) => return fail(&error, format),
    };
    match printed {
        Ok(()) => 0,
        Err(error) => {
            console::eprintln(&format!("error: cannot write the token: {error}"));
            1
        }
    }
}

/// Reports `error` as `token` does (stderr, and stdout for `--format executable`); returns
/// the exit code.
pub fn fail(error: &ClientError, format: TokenFormat) -> u8 {
    if format == TokenFormat::Executable {
        // Its exit code says the rest when stdout is gone.
        let _ = executable::print_response(&executable::error_response(error));
    }
    console::eprintln(&format!("error: {error}"));
    error.exit_code()
}

/// Why `token --session-file` is refused: the option was removed, and a script that still
/// passes it must not get a token made some other way than it asked for.
pub const SESSION_FILE_REMOVED: &str = "--session-file was removed: writing a TLS session to a \
     file needs an encoding rustls does not offer, and the patched copy of rustls that added \
     one kept rustls' security releases from reaching token-broker; drop --session-file (each \
     run then makes a full TLS handshake; `token-broker agent` still resumes in memory)";

/// The token and its executable-source response, with the files written.
fn obtain(
    client: impl FnOnce() -> Result<BrokerClient, ClientError>,
    binding: impl FnOnce() -> Result<String, String>,
    mut params: TokenParams,
    cache: Option<&Path>,
    format: TokenFormat,
    env: &ExecutableEnv,
) -> Result<(Token, Value), ClientError> {
    let executable = format == TokenFormat::Executable;
    let token_type = match executable {
        true => env.prepare(&mut params)?,
        false => executable::ID_TOKEN_TYPE,
    };
    // Only a token fetched from the same broker, trusted the same way, with the same device
    // certificate is reused; a binding that cannot be computed reuses nothing.
    let binding = match cache {
        Some(_) => binding().unwrap_or_else(|reason| {
            if !executable {
                tracing::warn!(
                    reason,
                    "token cache not used: cannot tell what its tokens are bound to"
                );
            }
            String::new()
        }),
        None => String::new(),
    };
    let cache = cache.map(|path| TokenCacheFile::new(path, binding.clone()));
    let cached = cache.as_ref().and_then(|cache| match cache.load(&params) {
        Ok(token) => token,
        Err(reason) => {
            // Libraries read stderr as part of the response: only other formats warn.
            if !executable {
                tracing::warn!(cache = %cache.path().display(), reason, "token cache ignored; fetching a new token");
            }
            None
        }
    });
    let fetched = cached.is_none();
    let token = match cached {
        Some(token) => token,
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Local(e.to_string()))?
            .block_on(async { client()?.fetch(&params).await })?,
    };
    let response = executable::response(&token, token_type);
    let contents = TokenCacheFile::contents(&params, &binding, &token, response.clone());
    let output_file = env.output_file.as_deref().filter(|_| executable);
    if let Some(cache) = cache.as_ref().filter(|_| fetched) {
        cache.store(&contents)?;
    }
    // The library's file, unless it is the cache (which holds this token already).
    if let Some(path) = output_file.filter(|path| Some(*path) != cache.as_ref().map(|c| c.path())) {
        TokenCacheFile::new(path, binding.clone()).store(&contents)?;
    }
    Ok((token, response))
}
