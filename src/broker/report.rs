//! `check-config`'s report: the effective config, what was loaded, and what to watch.

use std::fmt::Write;

use super::Broker;
use crate::clock::rfc3339;

impl Broker {
    /// The effective config as TOML, then `# ` lines: counts, each CA's pin (as
    /// `server.client_ca_pins` takes it, so an operator can pin what is trusted today),
    /// each CRL with where its signature is checked, and the warnings at `now`.
    pub fn report(&self, now: i64) -> Result<String, toml::ser::Error> {
        let mut out = toml::to_string(&self.config)?;
        out.push('\n');
        let trust = &self.trust;
        let roots = trust.cas.iter().filter(|c| c.is_root).count();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "# ok: {roots} root CA(s), {} intermediate(s), {} CRL(s), {} client rule(s), flows: {}",
            trust.cas.len() - roots,
            trust.crl_count(),
            self.rules.len(),
            self.flows.names().join(", ")
        );
        for ca in &trust.cas {
            let kind = if ca.is_root { "root" } else { "intermediate" };
            let _ = writeln!(out, "# {kind} CA {}: pin \"{}\"", ca.subject, ca.pin);
        }
        // Every CRL read, files and downloads alike, and whether it is the one in force for
        // its CA (the highest cRLNumber of that CA's admitted CRLs) or why not.
        for status in trust.crl_statuses() {
            let standing = match &status.shadowed_by {
                None => "in force".to_string(),
                Some(why) => format!("NOT in force: {why}"),
            };
            let Some(crl) = &status.crl else {
                let _ = writeln!(out, "# CRL {}: {standing}", status.source);
                continue;
            };
            let check = if crl.verified_at_load {
                "signature verified against the bundle"
            } else {
                "issuer not in the bundle: signature checked per request against the intermediate clients send"
            };
            let next_update = crl.next_update.map_or("none".into(), rfc3339);
            let _ = writeln!(
                out,
                "# CRL {}: issuer {}, number {}, thisUpdate {}, nextUpdate {next_update}, {} revoked, {check}; {standing}",
                crl.source,
                crl.issuer,
                crl.number,
                rfc3339(crl.this_update),
                crl.revoked,
            );
        }
        for warning in self.warnings(now) {
            let _ = writeln!(out, "# warning: {warning}");
        }
        Ok(out)
    }
}
