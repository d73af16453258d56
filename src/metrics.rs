//! Prometheus metrics (prefix `token_broker_`), as listed in docs/reference/metrics.md.
//!
//! Label values are bounded: flow names, rule names, refusal reasons, status codes and error
//! codes, never subjects or serials. One registry per [`Metrics`] so tests can run several
//! brokers in one process.

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// Prepended (with `_`) to every metric's name by the registry.
const PREFIX: &str = "token_broker";

pub struct Metrics {
    registry: Registry,
    pub tokens_issued: IntCounterVec,
    pub token_requests: IntCounterVec,
    pub cert_rejections: IntCounterVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_resumed_handshakes: IntCounter,
    pub request_duration: HistogramVec,
    pub signer_duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub verified_chain_hits: IntCounter,
    pub verified_chain_misses: IntCounter,
    pub config_reloads: IntCounterVec,
    pub signing_key_expiry: Gauge,
    pub open_connections: IntGauge,
    pub refused_connections: IntCounterVec,
    pub ca_cert_expiry: Gauge,
    pub crl_fetches: IntCounterVec,
    pub crl_this_update: GaugeVec,
    pub crl_next_update: GaugeVec,
    pub crl_kept_not_in_force: GaugeVec,
    pub readiness: GaugeVec,
    pub config_pending_restart: GaugeVec,
    pub audit_file_write_failures: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new_custom(Some(PREFIX.into()), None)
            .expect("static registry prefix is valid");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("static metric")
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            GaugeVec::new(Opts::new(name, help), labels).expect("static metric")
        };
        let histogram = |name: &str, help: &str, label: &str, buckets: Vec<f64>| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &[label])
                .expect("static metric")
        };
        let fast = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0,
        ];
        let metrics = Metrics {
            tokens_issued: counter(
                "tokens_issued_total",
                "Tokens issued, by flow and client rule.",
                &["flow", "client"],
            ),
            token_requests: counter(
                "token_requests_total",
                "Token endpoint answers, by HTTP status and OAuth error code.",
                &["code", "error"],
            ),
            cert_rejections: counter(
                "client_cert_rejections_total",
                "Client certificates refused, by reason.",
                &["reason"],
            ),
            tls_handshakes: counter(
                "tls_handshakes_total",
                "TLS handshakes, by result.",
                &["result"],
            ),
            tls_resumed_handshakes: IntCounter::new(
                "tls_resumed_handshakes_total",
                "Successful TLS handshakes that resumed a session (also counted as ok).",
            )
            .expect("static metric"),
            refused_connections: counter(
                "refused_connections_total",
                "Connections closed before the handshake, by cause.",
                &["cause"],
            ),
            request_duration: histogram(
                "request_duration_seconds",
                "HTTP request duration, by route.",
                "route",
                fast.clone(),
            ),
            signer_duration: histogram(
                "signer_duration_seconds",
                "Time to sign one token, by signer kind.",
                "kind",
                fast.clone(),
            ),
            upstream_requests: counter(
                "upstream_requests_total",
                "Calls to Google APIs, by API and HTTP status (or timeout/error).",
                &["api", "code"],
            ),
            upstream_duration: histogram(
                "upstream_duration_seconds",
                "Duration of one call to a Google API, by API.",
                "api",
                fast,
            ),
            cache_hits: IntCounter::new("token_cache_hits_total", "Tokens served from the cache.")
                .expect("static metric"),
            cache_misses: IntCounter::new(
                "token_cache_misses_total",
                "Tokens minted because the cache had none fresh.",
            )
            .expect("static metric"),
            verified_chain_hits: IntCounter::new(
                "verified_chain_cache_hits_total",
                "Client chains not validated again: an earlier verdict of this build still held.",
            )
            .expect("static metric"),
            verified_chain_misses: IntCounter::new(
                "verified_chain_cache_misses_total",
                "Client chains validated (whatever the outcome).",
            )
            .expect("static metric"),
            config_reloads: counter(
                "config_reloads_total",
                "Configuration reloads, by result.",
                &["result"],
            ),
            signing_key_expiry: Gauge::new(
                "signing_key_expiry_timestamp_seconds",
                "When the active signing key reaches its rotate_after age (Unix time).",
            )
            .expect("static metric"),
            open_connections: IntGauge::new("open_connections", "Open client connections.")
                .expect("static metric"),
            ca_cert_expiry: Gauge::new(
                "ca_cert_expiry_timestamp_seconds",
                "Earliest notAfter (Unix time) of the client CA bundle.",
            )
            .expect("static metric"),
            crl_fetches: counter(
                "crl_fetches_total",
                "Downloads of configured CRL sources, by source URL and result.",
                &["source", "result"],
            ),
            crl_this_update: gauge(
                "crl_this_update_timestamp_seconds",
                "thisUpdate (Unix time) of each loaded CRL, by source (file or URL): its age is time() minus this.",
                &["source"],
            ),
            crl_next_update: gauge(
                "crl_next_update_timestamp_seconds",
                "nextUpdate (Unix time) of each loaded CRL, by source (file or URL); past it, the certificates it covers are refused.",
                &["source"],
            ),
            crl_kept_not_in_force: gauge(
                "crl_kept_not_in_force",
                "1 while a CRL source's kept copy is not the CRL in force for its CA (downloaded but not yet enforced by a reload, not admitted, or older than a CRL of another origin), by source URL; check-config says which and why.",
                &["source"],
            ),
            readiness: gauge(
                "readiness",
                "1 when the readiness check passes, 0 when it fails, by check (listener, signer, crls, draining), as /readyz or /metrics last ran it.",
                &["check"],
            ),
            config_pending_restart: gauge(
                "config_pending_restart",
                "1 while a setting read only at start differs in the config file from the running value, by setting.",
                &["setting"],
            ),
            audit_file_write_failures: IntCounter::new(
                "audit_file_write_failures_total",
                "Batches of audit lines the audit file refused (disk full, I/O error); each went to the main log instead.",
            )
            .expect("static metric"),
            registry,
        };
        for collector in metrics.collectors() {
            metrics.registry.register(collector).expect("unique metric");
        }
        metrics
    }

    /// Every metric, once: what `new` registers and what [`Metrics::catalogue`] lists. The
    /// exhaustive pattern makes a new field a compile error until it is added here.
    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let Metrics {
            registry: _,
            tokens_issued,
            token_requests,
            cert_rejections,
            tls_handshakes,
            tls_resumed_handshakes,
            request_duration,
            signer_duration,
            upstream_requests,
            upstream_duration,
            cache_hits,
            cache_misses,
            verified_chain_hits,
            verified_chain_misses,
            config_reloads,
            signing_key_expiry,
            open_connections,
            refused_connections,
            ca_cert_expiry,
            crl_fetches,
            crl_this_update,
            crl_next_update,
            crl_kept_not_in_force,
            readiness,
            config_pending_restart,
            audit_file_write_failures,
        } = self;
        vec![
            Box::new(tokens_issued.clone()),
            Box::new(token_requests.clone()),
            Box::new(cert_rejections.clone()),
            Box::new(tls_handshakes.clone()),
            Box::new(tls_resumed_handshakes.clone()),
            Box::new(request_duration.clone()),
            Box::new(signer_duration.clone()),
            Box::new(upstream_requests.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(cache_hits.clone()),
            Box::new(cache_misses.clone()),
            Box::new(verified_chain_hits.clone()),
            Box::new(verified_chain_misses.clone()),
            Box::new(config_reloads.clone()),
            Box::new(signing_key_expiry.clone()),
            Box::new(open_connections.clone()),
            Box::new(refused_connections.clone()),
            Box::new(ca_cert_expiry.clone()),
            Box::new(crl_fetches.clone()),
            Box::new(crl_this_update.clone()),
            Box::new(crl_next_update.clone()),
            Box::new(crl_kept_not_in_force.clone()),
            Box::new(readiness.clone()),
            Box::new(config_pending_restart.clone()),
            Box::new(audit_file_write_failures.clone()),
        ]
    }

    /// Every metric's exposed name and label names, including labelled metrics that have no
    /// sample yet (the exposition leaves those out).
    pub fn catalogue(&self) -> Vec<(String, Vec<String>)> {
        self.collectors()
            .iter()
            .flat_map(|collector| {
                collector
                    .desc()
                    .into_iter()
                    .map(|desc| {
                        let name = format!("{PREFIX}_{}", desc.fq_name);
                        (name, desc.variable_labels.clone())
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every series name a query can select: each metric's name, or for a histogram its
    /// `_bucket`, `_sum` and `_count` series. What dashboards and alert rules may name.
    pub fn series_names(&self) -> Vec<String> {
        self.collectors()
            .iter()
            .flat_map(|collector| collector.collect())
            .flat_map(|family| {
                let name = format!("{PREFIX}_{}", family.name());
                match family.get_field_type() {
                    MetricType::HISTOGRAM => ["_bucket", "_sum", "_count"]
                        .map(|suffix| format!("{name}{suffix}"))
                        .to_vec(),
                    _ => vec![name],
                }
            })
            .collect()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
