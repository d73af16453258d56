//! Google's executable-sourced credential contract (AIP-4117), as `token --format executable`
//! speaks it: what the client library tells the executable through its environment, the
//! response it reads from stdout or from the configuration's `output_file`, and the error it
//! shows its user.
//!
//! The libraries (google-auth-library-python `pluggable.py`, -nodejs
//! `pluggable-auth-client.ts`) read `output_file` first and run the executable only when the
//! response there is missing, unsuccessful or past its `expiration_time`; they merge the
//! executable's stderr into its stdout, so a successful run must print nothing but the JSON.
//! A PKCS#11 module writes to the process's own stdout and stderr (tpm2-pkcs11's TCTI
//! errors, p11-kit's warnings) where no Rust code can stop it without `unsafe`, so a run
//! with a `pkcs11:` key or certificate runs itself again as a child whose output it reads
//! ([`run_with_output_captured`]).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::clock::unix_now;
use crate::device::client::{ClientError, Token, TokenParams, REFRESH_MARGIN};

pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const SAML_TYPE: &str = "urn:ietf:params:oauth:token-type:saml2";

/// What the library sets for the executable (the credential configuration's fields).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutableEnv {
    /// `GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE`: the STS audience, the workload identity provider
    /// (`//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/P/providers/R`).
    pub audience: Option<String>,
    /// `GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE`: the configuration's `subject_token_type`.
    pub token_type: Option<String>,
    /// `GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL`: the account the library itself
    /// impersonates after STS. Informational: the subject token is the same for every account,
    /// and IAM (the pool's `workloadIdentityUser` bindings) decides.
    pub impersonated_email: Option<String>,
    /// `GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE`: where the library looks for a response first.
    pub output_file: Option<PathBuf>,
}

impl ExecutableEnv {
    /// The variables of this process; empty ones count as unset.
    pub fn from_process() -> ExecutableEnv {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        ExecutableEnv {
            audience: var("GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE"),
            token_type: var("GOOGLE_EXTERNAL_ACCOUNT_TOKEN_TYPE"),
            impersonated_email: var("GOOGLE_EXTERNAL_ACCOUNT_IMPERSONATED_EMAIL"),
            output_file: var("GOOGLE_EXTERNAL_ACCOUNT_OUTPUT_FILE").map(PathBuf::from),
        }
    }

    /// Completes `params` from the environment (the audience, when `--audience` is not
    /// given) and returns the subject token type to answer with; refuses what would only fail
    /// later at STS, saying what to change.
    pub fn prepare(&self, params: &mut TokenParams) -> Result<&'static str, ClientError> {
        let refuse = |code: &'static str, message: String| ClientError::Contract { code, message };
        if params.scope.is_some() || params.service_account.is_some() {
            return Err(refuse(
                "invalid_request",
                "--format executable hands the library a subject token (the broker's ID token) \
                 for STS; drop --scope and --service-account: the library impersonates the \
                 service account of its service_account_impersonation_url itself"
                    .into(),
            ));
        }
        let token_type = match self.token_type.as_deref() {
            None | Some(ID_TOKEN_TYPE) => ID_TOKEN_TYPE,
            Some(JWT_TYPE) => JWT_TYPE,
            Some(other) => {
                let what = if other == SAML_TYPE {
                    "SAML assertions".to_owned()
                } else {
                    format!("subject tokens of type {other}")
                };
                return Err(refuse(
                    "unsupported_token_type",
                    format!(
                        "token-broker issues OIDC ID tokens (JWTs), not {what}: set \
                         subject_token_type to {ID_TOKEN_TYPE} in the credential configuration"
                    ),
                ));
            }
        };
        if let Some(provider) = &self.audience {
            let expected = provider_default_audience(provider);
            match (&params.audience, expected) {
                (None, Some(expected)) => params.audience = Some(expected),
                (None, None) => {
                    return Err(refuse(
                        "invalid_target",
                        format!(
                            "the credential configuration's audience {provider} \
                             (GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE) is not a workload identity \
                             provider name (//iam.googleapis.com/...); pass --audience"
                        ),
                    ))
                }
                // A provider's default audience that names another provider: STS would
                // refuse the token. Any other --audience is a custom allowed audience.
                (Some(given), expected) => {
                    if is_provider_default_audience(given) && expected.as_ref() != Some(given) {
                        return Err(refuse(
                            "invalid_target",
                            format!(
                                "--audience {given} names another workload identity provider \
                                 than the credential configuration's audience {provider} \
                                 (GOOGLE_EXTERNAL_ACCOUNT_AUDIENCE), so STS would refuse the \
                                 token; make both name the same provider"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(token_type)
    }
}

/// The audience Google's OIDC providers allow by default: `https:` and the provider's name.
fn provider_default_audience(provider: &str) -> Option<String> {
    provider
        .starts_with("//")
        .then(|| format!("https:{provider}"))
}

fn is_provider_default_audience(audience: &str) -> bool {
    audience.starts_with("https://iam.")
        && (audience.contains("/workloadIdentityPools/") || audience.contains("/workforcePools/"))
        && audience.contains("/providers/")
}

/// The success response. `expiration_time` is when the token stops being handed out (a
/// minute before it expires, as the cache does), so a library never takes a token from
/// `output_file` that expires on its way to STS.
pub fn response(token: &Token, token_type: &str) -> Value {
    let usable_until = token.expires_at - REFRESH_MARGIN;
    json!({
        "version": 1,
        "success": true,
        "token_type": token_type,
        "id_token": token.id_token.as_deref().unwrap_or(&token.access_token),
        "expiration_time": if usable_until > unix_now() { usable_until } else { token.expires_at },
    })
}

/// The error response: Python shows `code` and `message` ("Executable returned unsuccessful
/// response: code: ..., message: ..."); on a non-zero exit both libraries show the whole
/// output instead.
pub fn error_response(error: &ClientError) -> Value {
    json!({ "version": 1, "success": false, "code": error.code(), "message": error.to_string() })
}

/// Set in the environment of the child [`run_with_output_captured`] starts.
const CAPTURED: &str = "TOKEN_BROKER_OUTPUT_CAPTURED";

/// Whether this run should be made again by a child whose output is captured: it loads a
/// PKCS#11 module (`uses_pkcs11`), and is not that child already.
pub fn should_capture_output(uses_pkcs11: bool) -> bool {
    uses_pkcs11 && std::env::var_os(CAPTURED).is_none()
}

/// Prints the executable-source response: alone, or, in a child whose output is captured,
/// after the marker its parent gave, so that nothing a module prints on stdout (buffered
/// and flushed at exit, after it) can be taken for it.
pub fn print_response(response: &Value) -> std::io::Result<()> {
    match std::env::var(CAPTURED) {
        Ok(marker) if !marker.is_empty() => crate::console::println(&format!("{marker}{response}")),
        _ => crate::console::println(&response.to_string()),
    }
}

/// Runs this same command (`/proc/self/exe`, which survives an upgrade of the binary, the
/// same arguments and environment) as a child, and prints only its response: the line after
/// a marker made for this run. Nothing else of the child's stdout is printed anywhere (a
/// module's output, and nothing that could carry a token). On success nothing else is
/// printed; on failure the child's stderr (its error, a module's complaints) goes to stderr.
/// Returns the child's exit code, 0 when it printed a successful response.
pub fn run_with_output_captured() -> u8 {
    let marker = format!("token-broker-response-{}:", uuid::Uuid::new_v4());
    let exe = match std::path::Path::new("/proc/self/exe").exists() {
        true => Ok(std::path::PathBuf::from("/proc/self/exe")),
        false => std::env::current_exe(),
    };
    let output = exe.and_then(|exe| {
        Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(CAPTURED, &marker)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
    });
    let output = match output {
        Ok(output) => output,
        Err(e) => {
            let error = ClientError::Local(format!(
                "cannot run token again to capture a PKCS#11 module's output: {e}"
            ));
            let _ = crate::console::println(&error_response(&error).to_string());
            crate::console::eprintln(&format!("error: {error}"));
            return error.exit_code();
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let response = stdout
        .lines()
        .filter_map(|line| line.find(&marker).map(|at| &line[at + marker.len()..]))
        .next_back()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .filter(Value::is_object);
    let code = match output.status.code() {
        Some(code) => u8::try_from(code).unwrap_or(1),
        None => 1,
    };
    match response {
        // A token was fetched (and kept where asked): that is the run's outcome, whatever
        // a module did while the process ended.
        Some(response) if response["success"] == true => {
            return match crate::console::println(&response.to_string()) {
                Ok(()) => 0,
                Err(_) => 1,
            };
        }
        Some(response) => {
            let _ = crate::console::println(&response.to_string());
        }
        None => {
            let error = ClientError::Local(format!(
                "token ended without a response (exit {})",
                output.status
            ));
            let _ = crate::console::println(&error_response(&error).to_string());
            crate::console::eprintln(&format!("error: {error}"));
        }
    }
    let _ = std::io::stderr().lock().write_all(&output.stderr);
    if code == 0 {
        1
    } else {
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROVIDER: &str =
        "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/r";

    fn env(audience: Option<&str>, token_type: Option<&str>) -> ExecutableEnv {
        ExecutableEnv {
            audience: audience.map(str::to_owned),
            token_type: token_type.map(str::to_owned),
            ..ExecutableEnv::default()
        }
    }

    fn prepared(
        env: &ExecutableEnv,
        audience: Option<&str>,
    ) -> Result<(&'static str, Option<String>), ClientError> {
        let mut params = TokenParams {
            audience: audience.map(str::to_owned),
            ..TokenParams::default()
        };
        env.prepare(&mut params).map(|t| (t, params.audience))
    }

    #[test]
    fn the_configurations_audience_is_used_when_none_is_given() {
        let (token_type, audience) = prepared(&env(Some(PROVIDER), None), None).unwrap();
        assert_eq!(token_type, ID_TOKEN_TYPE);
        assert_eq!(audience.unwrap(), format!("https:{PROVIDER}"));
        // --audience wins: a custom allowed audience, or the same provider's default.
        for given in ["devices-fleet".to_owned(), format!("https:{PROVIDER}")] {
            let (_, audience) = prepared(&env(Some(PROVIDER), None), Some(&given)).unwrap();
            assert_eq!(audience.unwrap(), given);
        }
        assert_eq!(prepared(&env(None, None), None).unwrap().1, None);
    }

    #[test]
    fn an_audience_naming_another_provider_is_refused_saying_so() {
        let other = format!("https:{}", PROVIDER.replace("providers/r", "providers/x"));
        let error = prepared(&env(Some(PROVIDER), None), Some(&other)).unwrap_err();
        assert_eq!((error.code(), error.exit_code()), ("invalid_target", 1));
        assert!(error.to_string().contains("same provider"), "{error}");
        let error = prepared(&env(Some("sts-audience"), None), None).unwrap_err();
        assert!(error.to_string().contains("pass --audience"), "{error}");
    }

    #[test]
    fn only_oidc_subject_token_types_are_issued() {
        assert_eq!(
            prepared(&env(None, Some(JWT_TYPE)), None).unwrap().0,
            JWT_TYPE
        );
        for unsupported in [SAML_TYPE, "urn:ietf:params:oauth:token-type:access_token"] {
            let error = prepared(&env(None, Some(unsupported)), None).unwrap_err();
            assert_eq!(error.code(), "unsupported_token_type");
            assert!(error.to_string().contains(ID_TOKEN_TYPE), "{error}");
        }
        assert!(prepared(&env(None, Some(SAML_TYPE)), None)
            .unwrap_err()
            .to_string()
            .contains("not SAML assertions"));
    }

    #[test]
    fn google_access_token_requests_are_refused() {
        let mut params = TokenParams {
            service_account: Some("sa@p.iam.gserviceaccount.com".into()),
            ..TokenParams::default()
        };
        let error = ExecutableEnv::default().prepare(&mut params).unwrap_err();
        assert_eq!(error.code(), "invalid_request");
    }
}
