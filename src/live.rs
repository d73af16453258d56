//! The broker that serves now: every request reads it, a reload replaces it whole (a broken
//! new config never replaces a working one), and it knows whether the process drains.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use crate::broker::{Broker, Problems};
use crate::config::Config;
use crate::logging::AuditLog;
use crate::metrics::Metrics;

/// The broker currently serving, and whether the process is draining.
pub struct Live {
    broker: ArcSwap<Broker>,
    /// Where the config came from; reloads re-read it. `None`: no reloads.
    config_path: Option<PathBuf>,
    draining: AtomicBool,
    /// The TLS listener accepts connections (from `Server::run` until the drain closes it).
    listening: AtomicBool,
    /// What the settings read only at start were when the process started.
    started: StartOnly,
    /// Where audit lines go (`[audit] path`), when this process routes them.
    audit: Option<Arc<AuditLog>>,
    /// Held by the reload in progress: reloads run one at a time, each reading the files
    /// after the one before it installed its broker, so an older read never lands last.
    reloading: Mutex<()>,
    /// Wakes the CRL downloader to fetch every source now (SIGHUP).
    fetch_crls: Arc<tokio::sync::Notify>,
    /// The configuration warnings of the broker serving now: a reload (every CRL download
    /// is one) logs only those that are new, not the same ones again.
    warned: Mutex<Vec<String>>,
}

/// The settings the server reads once, at start (listeners, the connection limit, the
/// token cache that carries over reloads, the development PKI): name and value as text.
type StartOnly = [(&'static str, String); 6];

fn start_only(config: &Config) -> StartOnly {
    let (cache_capacity, refresh_margin) = config.token_cache();
    let pki_dir = config.dev.pki_dir.as_ref();
    [
        ("server.listen", config.server.listen.to_string()),
        ("admin.listen", format!("{:?}", config.admin.listen)),
        (
            "server.max_connections",
            config.server.max_connections.to_string(),
        ),
        ("google.cache_capacity", cache_capacity.to_string()),
        ("google.refresh_margin", format!("{refresh_margin:?}")),
        (
            "dev.pki_dir",
            pki_dir.map_or("none".into(), |dir| format!("{:?}", config.path(dir))),
        ),
    ]
}

impl Live {
    pub fn new(broker: Arc<Broker>, config_path: Option<PathBuf>) -> Live {
        let warned = log_new_warnings(&broker, &[]);
        let started = start_only(broker.config());
        for (setting, _) in &started {
            broker
                .metrics()
                .config_pending_restart
                .with_label_values(&[setting])
                .set(0.0);
        }
        Live {
            broker: ArcSwap::from(broker),
            config_path,
            draining: AtomicBool::new(false),
            listening: AtomicBool::new(false),
            started,
            audit: None,
            reloading: Mutex::new(()),
            fetch_crls: Arc::new(tokio::sync::Notify::new()),
            warned: Mutex::new(warned),
        }
    }

    /// Keeps `audit` at the configured path: moved when a reload changes `[audit] path`,
    /// reopened by [`Live::reopen_audit_log`].
    pub fn with_audit_log(mut self, audit: Arc<AuditLog>) -> Live {
        audit.count_failures_in(self.metrics().audit_file_write_failures.clone());
        self.audit = Some(audit);
        self
    }

    /// Opens the audit file again at the configured path (SIGHUP: after logrotate renamed
    /// it, lines go to a new file). On failure the lines keep going to the file open so far.
    pub fn reopen_audit_log(&self) {
        if let Some(audit) = &self.audit {
            let path = self.current().config().audit_path();
            match audit.open_at(path.as_deref()) {
                Ok(()) => {
                    if let Some(path) = path {
                        tracing::info!(path = %path.display(), "audit log reopened");
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "audit log not reopened; audit lines still go where they went")
                }
            }
        }
    }

    pub fn current(&self) -> Arc<Broker> {
        self.broker.load_full()
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.broker.load().metrics().clone()
    }

    /// From now on not ready: the process is shutting down.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::Relaxed);
    }

    pub fn is_listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed)
    }

    /// What the CRL downloader waits on besides its schedule.
    pub fn crl_fetch_requests(&self) -> Arc<tokio::sync::Notify> {
        self.fetch_crls.clone()
    }

    /// Makes every CRL source due now (SIGHUP).
    pub fn fetch_crls_now(&self) {
        self.fetch_crls.notify_one();
    }

    /// Re-reads the config and every file it names; keeps the old state on any problem.
    /// Blocks while another reload runs.
    pub fn reload(&self) -> Result<(), Problems> {
        let Some(path) = &self.config_path else {
            return Ok(());
        };
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let old = self.current();
        let result = Config::load(path)
            .map_err(|e| Problems(vec![e.to_string()]))
            .and_then(|config| Broker::rebuild(config, &old));
        let label = if result.is_ok() { "ok" } else { "error" };
        old.metrics()
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match result {
            Ok(broker) => {
                let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
                *warned = log_new_warnings(&broker, &warned);
                drop(warned);
                self.note_pending_restart(&broker);
                let audit_path = broker.config().audit_path();
                self.broker.store(Arc::new(broker));
                // Also retries a path that could not be opened before.
                if self.audit.as_ref().is_some_and(|a| a.path() != audit_path) {
                    self.reopen_audit_log();
                }
                tracing::info!("configuration reloaded");
                Ok(())
            }
            Err(problems) => {
                for problem in &problems.0 {
                    tracing::error!(%problem, "reload failed; still serving the previous configuration");
                }
                Err(problems)
            }
        }
    }

    /// Names each start-only setting whose value in the new config is not the running one
    /// (a warning per setting, `config_pending_restart` 1), and clears those back in line.
    fn note_pending_restart(&self, new: &Broker) {
        let gauge = &new.metrics().config_pending_restart;
        for ((setting, running), (_, configured)) in
            self.started.iter().zip(start_only(new.config()))
        {
            let pending = *running != configured;
            if pending {
                tracing::warn!(
                    setting,
                    running = %running,
                    configured = %configured,
                    "setting changed in the config file; it applies only after a restart"
                );
            }
            gauge
                .with_label_values(&[setting])
                .set(if pending { 1.0 } else { 0.0 });
        }
    }
}

/// What `check-config` would warn of, in the log of the broker that goes live: each warning
/// not in `before` (the previous broker's), so a reload repeats none. Returns them all.
fn log_new_warnings(broker: &Broker, before: &[String]) -> Vec<String> {
    let warnings = broker.warnings(crate::clock::unix_now());
    for warning in warnings.iter().filter(|w| !before.contains(w)) {
        tracing::warn!(%warning, "configuration warning");
    }
    warnings
}
