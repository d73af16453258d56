//! The broker that serves now: every request reads it, a reload replaces it whole (a broken
//! new config never replaces a working one), and it knows whether the process drains.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::broker::{Broker, Problems};
use crate::config::Config;
use crate::metrics::Metrics;

/// The broker currently serving, and whether the process is draining.
pub struct Live {
    broker: ArcSwap<Broker>,
    /// Where the config came from; reloads re-read it. `None`: no reloads.
    config_path: Option<PathBuf>,
    draining: AtomicBool,
    /// The TLS listener accepts connections (from `Server::run` until the drain closes it).
    listening: AtomicBool,
}

impl Live {
    pub fn new(broker: Arc<Broker>, config_path: Option<PathBuf>) -> Live {
        log_warnings(&broker);
        Live {
            broker: ArcSwap::from(broker),
            config_path,
            draining: AtomicBool::new(false),
            listening: AtomicBool::new(false),
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

    /// Re-reads the config and every file it names; keeps the old state on any problem.
    pub fn reload(&self) -> Result<(), Problems> {
        let Some(path) = &self.config_path else {
            return Ok(());
        };
        let old = self.current();
        let result = Config::load(path)
            .map_err(|e| Problems(vec![e.to_string()]))
            .and_then(|config| {
                if config.server.listen != old.config().server.listen
                    || config.admin.listen != old.config().admin.listen
                {
                    tracing::warn!("listen addresses change only on restart");
                }
                Broker::rebuild(config, &old)
            });
        let label = if result.is_ok() { "ok" } else { "error" };
        old.metrics()
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match result {
            Ok(broker) => {
                log_warnings(&broker);
                self.broker.store(Arc::new(broker));
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
}

/// What `check-config` would warn of, in the log of the broker that goes live.
fn log_warnings(broker: &Broker) {
    for warning in broker.warnings(crate::clock::unix_now()) {
        tracing::warn!(%warning, "configuration warning");
    }
}
