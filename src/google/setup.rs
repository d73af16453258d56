//! `token-broker wif-setup`: the gcloud commands that connect this issuer to a Google
//! workload identity pool, and what a device runs to use it (an executable-sourced credential
//! configuration, or the metadata agent).

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::json;

use crate::config::Config;

/// Where the printed device configuration expects the device's files.
pub const DEVICE_BINARY: &str = "/usr/local/bin/token-broker";
pub const DEVICE_CERT: &str = "/etc/device/cert.pem";
pub const DEVICE_KEY: &str = "/etc/device/key.pem";
pub const DEVICE_BROKER_CA: &str = "/etc/device/broker-ca.pem";
pub const DEVICE_OUTPUT_FILE: &str = "/var/cache/token-broker/google-subject-token.json";

/// What `wif-setup` prints: the script, and the warnings it also says on stderr.
pub struct WifSetup {
    pub script: String,
    pub warnings: Vec<String>,
}

/// Numbers the steps as they are printed, so optional ones leave no gap.
#[derive(Default)]
struct Steps(usize);

impl Steps {
    fn next(&mut self) -> usize {
        self.0 += 1;
        self.0
    }
}

/// The config file as `-c` names it in the script: absolute, so the script's `jwks` step
/// reads this config from any folder, never a `./config.toml` (say a development one).
fn config_argument(source: &std::path::Path) -> String {
    std::path::absolute(source)
        .unwrap_or_else(|_| source.to_path_buf())
        .display()
        .to_string()
}

/// `word` as one shell word: as is when it is plain, else in single quotes.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@,".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The whole setup as a commented shell script; `None` without `[google]`.
pub fn script(config: &Config, project_id: &str) -> Option<WifSetup> {
    let google = config.google.as_ref()?;
    let issuer = config.issuer.url.trim_end_matches('/');
    let pool = &google.pool_id;
    let provider = &google.provider_id;
    let number = &google.project_number;
    let audience = google.subject_token_audience();
    let warnings = reachability_warnings(&config.issuer.url);
    let pool_principals =
        format!("principalSet://iam.googleapis.com/projects/{number}/locations/global/workloadIdentityPools/{pool}");
    // (service account, client id) for every rule that lists service accounts.
    let grants: Vec<(&str, String)> = config
        .clients
        .iter()
        .flat_map(|rule| {
            let client_id = rule.client_id.clone().unwrap_or_else(|| rule.name.clone());
            rule.service_accounts
                .iter()
                .map(move |account| (account.as_str(), client_id.clone()))
        })
        .collect();
    let first_account = grants
        .first()
        .map_or("SERVICE_ACCOUNT_EMAIL", |(account, _)| *account);
    let mut steps = Steps::default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Workload Identity Federation for token-broker (issuer {issuer})\n\
         # Review, then run with gcloud authenticated as a project owner."
    );
    for warning in &warnings {
        let _ = writeln!(out, "# warning: {warning}");
    }
    let _ = writeln!(
        out,
        r#"
# {pool_step}. The pool.
gcloud iam workload-identity-pools create {pool} \
  --project={project_id} --location=global \
  --display-name="Devices via token-broker"

# {provider_step}. The OIDC provider trusting this broker. `sub` becomes google.subject (<= 127 bytes);
#    the certificate's SPIFFE ID and the client rule are available as attributes.
gcloud iam workload-identity-pools providers create-oidc {provider} \
  --project={project_id} --location=global --workload-identity-pool={pool} \
  --issuer-uri="{issuer}" \
  --allowed-audiences="{audience}" \
  --attribute-mapping="google.subject=assertion.sub,attribute.spiffe=assertion.client.x5_spiffe,attribute.client_id=assertion.client_id"
"#,
        pool_step = steps.next(),
        provider_step = steps.next(),
    );
    let upload_when = if warnings.is_empty() {
        format!("If Google cannot reach {issuer}/.well-known/openid-configuration")
    } else {
        "Google cannot reach this issuer (see the warnings above)".to_owned()
    };
    let _ = writeln!(
        out,
        "# {}. {upload_when}: upload the keys instead\n\
         #    (and again after every signing-key rotation).\n\
         token-broker -c {} jwks > jwks.json\n\
         gcloud iam workload-identity-pools providers update-oidc {provider} \\\n  \
         --project={project_id} --location=global --workload-identity-pool={pool} \\\n  \
         --jwk-json-path=jwks.json\n",
        steps.next(),
        shell_word(&config_argument(&config.source))
    );
    let _ = writeln!(
        out,
        "# {}. Let each client rule's devices impersonate its service accounts, and no others:\n\
         #    Google IAM, not the broker, is what finally enforces this, because a device can\n\
         #    take a federated token or its broker ID token to Google directly. The member is\n\
         #    the rule's client_id (attribute.client_id, mapped above).\n\
         #    (roles/iam.workloadIdentityUser covers generateAccessToken and generateIdToken.)",
        steps.next()
    );
    if grants.is_empty() {
        let _ = writeln!(out, "#    (no client rule lists service_accounts yet)\n");
    }
    for (account, client_id) in &grants {
        let _ = writeln!(
            out,
            "gcloud iam service-accounts add-iam-policy-binding {account} \\\n  --role=roles/iam.workloadIdentityUser \\\n  --member=\"{pool_principals}/attribute.client_id/{client_id}\"\n"
        );
    }
    if let crate::config::SignerConfig::Iam {
        service_account, ..
    } = &config.signer
    {
        let _ = writeln!(
            out,
            "# {}. The broker signs with IAM signJwt as {service_account}: its own identity needs\n\
             gcloud iam service-accounts add-iam-policy-binding {service_account} \\\n  --role=roles/iam.serviceAccountTokenCreator \\\n  --member=\"serviceAccount:BROKER_RUNTIME_SA\"\n",
            steps.next()
        );
    }
    let device_files =
        format!("--url {issuer} --cert {DEVICE_CERT} --key {DEVICE_KEY} --ca {DEVICE_BROKER_CA}");
    let device_config = json!({
        "type": "external_account",
        "audience": google.provider_resource(),
        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "token_url": format!("{}/v1/token", google.sts_url.trim_end_matches('/')),
        "service_account_impersonation_url": format!(
            "{}/v1/projects/-/serviceAccounts/{first_account}:generateAccessToken",
            google.iam_credentials_url.trim_end_matches('/'),
        ),
        "credential_source": {
            "executable": {
                "command": format!(
                    "{DEVICE_BINARY} token {device_files} --audience {audience} --format executable"
                ),
                "timeout_millis": 30000,
                "output_file": DEVICE_OUTPUT_FILE,
            }
        }
    });
    let output_dir = std::path::Path::new(DEVICE_OUTPUT_FILE)
        .parent()
        .map(|dir| dir.display().to_string())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "# {}. On each device: its certificate and key ({DEVICE_CERT}, {DEVICE_KEY}, mode 600),\n\
         #    the CA that signed the broker's server certificate ({DEVICE_BROKER_CA}; drop --ca\n\
         #    if that certificate is publicly trusted), and a folder only the device's user can\n\
         #    write for the response the libraries reuse until it expires (output_file):\n\
         #      install -d -m 700 -o DEVICE_USER {output_dir}\n\
         #    Then this credential configuration (executable-sourced: the library runs the command\n\
         #    and exchanges the broker's ID token itself). The device's client rule must allow\n\
         #    the flow mtls-client-credentials and the audience\n\
         #      {audience}\n\
         #    Use it with\n\
         #      export GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1\n\
         #      export GOOGLE_APPLICATION_CREDENTIALS=$PWD/device-credentials.json\n\
         cat > device-credentials.json <<'JSON'\n{}\nJSON\n",
        steps.next(),
        serde_json::to_string_pretty(&device_config).unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "# {}. Or, instead of the credential configuration: the metadata agent on the device, which\n\
         #    every Google library finds as the GCE metadata server (the broker impersonates the\n\
         #    account: the rule needs the impersonate flow, and google-id-token for ID tokens).\n\
         #      {DEVICE_BINARY} agent {device_files} \\\n\
         #        --service-account {first_account} --project-id {project_id} --numeric-project-id {number}\n\
         #      export GCE_METADATA_HOST=127.0.0.1:8080 GCE_METADATA_IP=127.0.0.1:8080",
        steps.next()
    );
    Some(WifSetup {
        script: out,
        warnings,
    })
}

/// Why Google could not fetch the issuer's discovery document and keys itself: it does so
/// over HTTPS from the public internet only.
pub fn reachability_warnings(issuer: &str) -> Vec<String> {
    let url = match url::Url::parse(issuer) {
        Ok(url) => url,
        Err(e) => return vec![format!("the issuer URL {issuer} does not parse: {e}")],
    };
    let upload = "upload the keys instead (the --jwk-json-path step)";
    let mut warnings = Vec::new();
    if url.scheme() != "https" {
        warnings.push(format!(
            "the issuer URL {issuer} is not https, and Google fetches discovery documents \
             over HTTPS only: {upload}"
        ));
    }
    let unreachable = match url.host() {
        Some(url::Host::Domain(name)) => private_name(name),
        Some(url::Host::Ipv4(ip)) => private_ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => private_ip(IpAddr::V6(ip)),
        None => Some("no host"),
    };
    if let Some(kind) = unreachable {
        let host = url.host_str().unwrap_or_default();
        warnings.push(format!(
            "the issuer URL {issuer} names {host}, {kind}, which Google cannot reach: {upload}"
        ));
    }
    warnings
}

/// Names only a local network resolves (RFC 6761 and RFC 6762 special-use names, and
/// single-label names).
fn private_name(name: &str) -> Option<&'static str> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let special = [
        "localhost",
        "local",
        "internal",
        "test",
        "invalid",
        "lan",
        "home.arpa",
    ];
    if special
        .iter()
        .any(|suffix| name == *suffix || name.ends_with(&format!(".{suffix}")))
    {
        return Some("a name only local networks resolve");
    }
    (!name.contains('.')).then_some("a single-label name only local networks resolve")
}

fn private_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => private_ipv4(ip),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => private_ipv4(v4),
            None => private_ipv6(ip),
        },
    }
}

fn private_ipv4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_private() || (a == 100 && (64..128).contains(&b)) {
        Some("a private address")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else if ip.is_unspecified() || ip.is_broadcast() || ip.is_documentation() {
        Some("an address no host has")
    } else {
        None
    }
}

fn private_ipv6(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unique_local() {
        Some("a private address")
    } else if ip.is_unicast_link_local() {
        Some("a link-local address")
    } else if ip.is_unspecified() {
        Some("an address no host has")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_quote_what_the_shell_would_split_or_expand() {
        assert_eq!(
            shell_word("/etc/token-broker/broker.toml"),
            "/etc/token-broker/broker.toml"
        );
        assert_eq!(
            shell_word("/srv/my config/$x.toml"),
            "'/srv/my config/$x.toml'"
        );
        assert_eq!(shell_word("/srv/it's.toml"), r"'/srv/it'\''s.toml'");
    }

    fn config(issuer: &str, signer: &str, accounts: &str) -> Config {
        Config::parse(&format!(
            r#"
[server]
listen = "127.0.0.1:0"
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"

[issuer]
url = "{issuer}"

{signer}

[google]
project_number = "42"
pool_id = "fleet"
provider_id = "broker"

[[clients]]
name = "devices"
match = {{ spiffe = ["spiffe://example.org/device/*"] }}
flows = ["mtls-client-credentials", "impersonate"]
service_accounts = [{accounts}]
"#
        ))
        .unwrap()
    }

    /// The numbers of the `# N. ` step headings, in order.
    fn step_numbers(script: &str) -> Vec<usize> {
        script
            .lines()
            .filter_map(|line| line.strip_prefix("# ")?.split_once(". ")?.0.parse().ok())
            .collect()
    }

    #[test]
    fn steps_are_numbered_one_to_n_whatever_is_left_out() {
        let local = "[signer]\nkind = \"local\"\nkey_dir = \"keys\"";
        let iam =
            "[signer]\nkind = \"iam\"\nservice_account = \"signer@p.iam.gserviceaccount.com\"";
        for (signer, accounts, steps) in [
            (local, "", 6),
            (local, "\"a@p.iam.gserviceaccount.com\"", 6),
            (iam, "\"a@p.iam.gserviceaccount.com\"", 7),
        ] {
            let setup = script(
                &config("https://broker.acme-devices.com", signer, accounts),
                "p",
            )
            .unwrap();
            assert_eq!(
                step_numbers(&setup.script),
                (1..=steps).collect::<Vec<_>>(),
                "{}",
                setup.script
            );
        }
    }

    #[test]
    fn issuers_google_cannot_reach_are_warned_about() {
        for issuer in [
            "https://localhost:8443",
            "https://broker.localhost",
            "https://127.0.0.1",
            "https://10.1.2.3/tenant",
            "https://172.16.0.9",
            "https://192.168.1.1",
            "https://100.64.0.1",
            "https://169.254.169.254",
            "https://[::1]:8443",
            "https://[fd00::1]",
            "https://[fe80::1]",
            "https://[::ffff:10.0.0.1]",
            "https://broker.internal",
            "https://broker.local",
            "https://broker",
        ] {
            let warnings = reachability_warnings(issuer);
            assert_eq!(warnings.len(), 1, "{issuer}: {warnings:?}");
            assert!(
                warnings[0].contains("cannot reach"),
                "{issuer}: {warnings:?}"
            );
        }
        let warnings = reachability_warnings("http://broker.acme-devices.com");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("not https"), "{warnings:?}");
        assert_eq!(reachability_warnings("http://127.0.0.1").len(), 2);
        for reachable in ["https://broker.acme-devices.com/tenant", "https://8.8.8.8"] {
            assert!(reachability_warnings(reachable).is_empty(), "{reachable}");
        }
        // The warnings open the script, and step 3 says to upload the keys.
        let local = "[signer]\nkind = \"local\"\nkey_dir = \"keys\"";
        let setup = script(&config("https://localhost:8443", local, ""), "p").unwrap();
        assert!(setup
            .script
            .contains("# warning: the issuer URL https://localhost:8443"));
        assert!(setup
            .script
            .contains("# 3. Google cannot reach this issuer (see the warnings above)"));
    }
}
