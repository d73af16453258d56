//! `token-broker wif-setup`: the gcloud commands that connect this issuer to a Google
//! workload identity pool, and a device credential configuration that uses it.

use std::fmt::Write;

use serde_json::json;

use crate::config::Config;

/// The whole setup as a commented shell script; `None` without `[google]`.
pub fn script(config: &Config, project_id: &str) -> Option<String> {
    let google = config.google.as_ref()?;
    let issuer = &config.issuer.url;
    let pool = &google.pool_id;
    let provider = &google.provider_id;
    let number = &google.project_number;
    let audience = google.subject_token_audience();
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
    let first_account = grants.first().map(|(a, _)| *a);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"# Workload Identity Federation for token-broker (issuer {issuer})
# Review, then run with gcloud authenticated as a project owner.

# 1. The pool.
gcloud iam workload-identity-pools create {pool} \
  --project={project_id} --location=global \
  --display-name="Devices via token-broker"

# 2. The OIDC provider trusting this broker. `sub` becomes google.subject (<= 127 bytes);
#    the certificate's SPIFFE ID and the client rule are available as attributes.
gcloud iam workload-identity-pools providers create-oidc {provider} \
  --project={project_id} --location=global --workload-identity-pool={pool} \
  --issuer-uri="{issuer}" \
  --allowed-audiences="{audience}" \
  --attribute-mapping="google.subject=assertion.sub,attribute.spiffe=assertion.client.x5_spiffe,attribute.client_id=assertion.client_id"

# 2b. If Google cannot reach {issuer}/.well-known/openid-configuration, upload the
#     keys instead (and repeat after every signing-key rotation):
#       token-broker jwks > jwks.json
#       gcloud iam workload-identity-pools providers update-oidc {provider} \
#         --project={project_id} --location=global --workload-identity-pool={pool} \
#         --jwk-json-path=jwks.json
"#
    );
    let _ = writeln!(
        out,
        "# 3. Let each client rule's devices impersonate its service accounts, and no others:\n\
         #    Google IAM, not the broker, is what finally enforces this, because a device can\n\
         #    take a federated token or its broker ID token to Google directly. The member is\n\
         #    the rule's client_id (attribute.client_id, mapped in step 2).\n\
         #    (roles/iam.workloadIdentityUser covers generateAccessToken and generateIdToken.)"
    );
    if grants.is_empty() {
        let _ = writeln!(out, "#    (no client rule lists service_accounts yet)");
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
            "# 4. The broker signs with IAM signJwt as {service_account}: its own identity needs\n\
             gcloud iam service-accounts add-iam-policy-binding {service_account} \\\n  --role=roles/iam.serviceAccountTokenCreator \\\n  --member=\"serviceAccount:BROKER_RUNTIME_SA\"\n"
        );
    }
    let device_config = json!({
        "type": "external_account",
        "audience": google.provider_resource(),
        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
        "token_url": format!("{}/v1/token", google.sts_url.trim_end_matches('/')),
        "service_account_impersonation_url": format!(
            "{}/v1/projects/-/serviceAccounts/{}:generateAccessToken",
            google.iam_credentials_url.trim_end_matches('/'),
            first_account.unwrap_or("SERVICE_ACCOUNT_EMAIL")
        ),
        "credential_source": {
            "executable": {
                "command": format!(
                    "/usr/bin/curl -sS --cert /etc/device/cert.pem --key /etc/device/key.pem \
                     -d grant_type=client_credentials -d format=external_credential \
                     -d audience={audience} {}/token",
                    issuer.trim_end_matches('/')
                ),
                "timeout_millis": 5000
            }
        }
    });
    let _ = writeln!(
        out,
        "# 5. A device credential configuration (executable-sourced; the client library runs the\n\
         #    command and exchanges its ID token itself). Needs GOOGLE_EXTERNAL_ACCOUNT_ALLOW_EXECUTABLES=1,\n\
         #    and the device's client rule must allow the audience {audience}.\n\
         cat > device-credentials.json <<'JSON'\n{}\nJSON",
        serde_json::to_string_pretty(&device_config).unwrap_or_default()
    );
    Some(out)
}
