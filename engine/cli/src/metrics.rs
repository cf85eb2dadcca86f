//! `--metrics ADDR`: the engine's figures in the Prometheus/OpenMetrics text format.
//!
//! The format is produced by `prometheus-client`, served by `tiny_http` on a thread of its own.
//! A bare port binds `127.0.0.1`: metrics are only exposed beyond the host when asked for.

use std::{
    net::SocketAddr,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow};
use lull::EngineStats;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TierLabel {
    tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObserverLabel {
    observer: &'static str,
}

/// Live metrics, updated by the run loop and read by the HTTP thread.
pub struct Metrics {
    connections: Family<StateLabel, Gauge>,
    probes_sent: Counter,
    probes_answered: Counter,
    deaths: Family<TierLabel, Counter>,
    closed: Counter,
    wakeups: Counter,
    wakeups_rearmed: Counter,
    detection: Histogram,
    source: Family<SourceLabel, Gauge>,
    udp_flows: Family<ObserverLabel, Gauge>,
    udp_probes_sent: Counter,
    last: Mutex<EngineStats>,
}

impl Metrics {
    /// Registers the metrics and starts serving them at `addr` on `/metrics`.
    pub fn serve(addr: SocketAddr) -> Result<Self> {
        let server = tiny_http::Server::http(addr).map_err(|e| anyhow!("binding {addr}: {e}"))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| anyhow!("{addr} is not an IP address"))?;
        let mut registry = Registry::with_prefix("lull");
        let metrics = Self {
            connections: Family::default(),
            probes_sent: Counter::default(),
            probes_answered: Counter::default(),
            deaths: Family::default(),
            closed: Counter::default(),
            wakeups: Counter::default(),
            wakeups_rearmed: Counter::default(),
            detection: Histogram::new(exponential_buckets(0.005, 2.0, 20)),
            source: Family::default(),
            udp_flows: Family::default(),
            udp_probes_sent: Counter::default(),
            last: Mutex::default(),
        };
        registry.register(
            "connections",
            "Watched connections by state",
            metrics.connections.clone(),
        );
        registry.register("probes_sent", "Probes sent", metrics.probes_sent.clone());
        registry.register(
            "probes_answered",
            "Probes answered by the peer",
            metrics.probes_answered.clone(),
        );
        registry.register(
            "deaths",
            "Dead-peer verdicts, by the tier that caught them (transport: the kernel gave up; \
             application: lull's probes went unanswered)",
            metrics.deaths.clone(),
        );
        registry.register("closed", "Connections found closed", metrics.closed.clone());
        registry.register("wakeups", "Timer expiries", metrics.wakeups.clone());
        registry.register(
            "wakeups_found_traffic",
            "Timer expiries that found traffic and sent nothing",
            metrics.wakeups_rearmed.clone(),
        );
        registry.register(
            "detection_latency_seconds",
            "Time from the last sign of life (or a known hang) to the dead verdict",
            metrics.detection.clone(),
        );
        registry.register(
            "activity_source",
            "The activity source in use (1 for the one in use)",
            metrics.source.clone(),
        );
        registry.register(
            "udp_flows",
            "Watched UDP flows (also counted in connections), by what sees their datagrams \
             (ebpf: the kernel programs; wrapper: the handles' own calls)",
            metrics.udp_flows.clone(),
        );
        registry.register(
            "udp_probes_sent",
            "Keep-warm and liveness datagrams sent to UDP flows (also counted in probes_sent)",
            metrics.udp_probes_sent.clone(),
        );
        serve_page(server, registry, || {})?;
        tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
        Ok(metrics)
    }

    /// Brings the metrics up to date with the engine's totals.
    pub fn update(&self, stats: &EngineStats) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let watching = stats
            .watched
            .saturating_sub(stats.probing + stats.dead_now + stats.inert_now);
        for (state, n) in [
            ("watching", watching),
            ("probing", stats.probing),
            ("dead", stats.dead_now),
            ("closed", stats.inert_now),
        ] {
            self.connections
                .get_or_create(&StateLabel { state })
                .set(n as i64);
        }
        self.probes_sent
            .inc_by(stats.probes_sent - last.probes_sent);
        self.probes_answered
            .inc_by(stats.probes_answered - last.probes_answered);
        for (tier, now, before) in [
            ("transport", stats.dead_transport, last.dead_transport),
            ("application", stats.dead_application, last.dead_application),
        ] {
            // Created at 0 even before the first death, so that a scrape sees both series.
            self.deaths
                .get_or_create(&TierLabel { tier })
                .inc_by(now - before);
        }
        self.closed.inc_by(stats.closed - last.closed);
        // Both series exist from the first update, at 0 until a flow of their kind is watched.
        for (observer, n) in [
            (
                "ebpf",
                stats
                    .datagram_flows
                    .saturating_sub(stats.datagram_flows_wrapper),
            ),
            ("wrapper", stats.datagram_flows_wrapper),
        ] {
            self.udp_flows
                .get_or_create(&ObserverLabel { observer })
                .set(n as i64);
        }
        self.udp_probes_sent
            .inc_by(stats.datagram_probes_sent - last.datagram_probes_sent);
        self.wakeups.inc_by(stats.wakeups - last.wakeups);
        self.wakeups_rearmed
            .inc_by(stats.wakeups_rearmed - last.wakeups_rearmed);
        if stats.source != last.source {
            if let Some(old) = last.source {
                self.source
                    .get_or_create(&SourceLabel {
                        source: old.to_string(),
                    })
                    .set(0);
            }
            if let Some(new) = stats.source {
                self.source
                    .get_or_create(&SourceLabel {
                        source: new.to_string(),
                    })
                    .set(1);
            }
        }
        *last = *stats;
    }

    /// Records one detection latency.
    pub fn observe_detection(&self, latency: Duration) {
        self.detection.observe(latency.as_secs_f64());
    }
}

/// Serves `registry` on `/metrics` from a thread of its own, calling `refresh` before each
/// scrape (for figures that are read on demand rather than pushed).
pub fn serve_page(
    server: tiny_http::Server,
    registry: Registry,
    mut refresh: impl FnMut() + Send + 'static,
) -> Result<()> {
    std::thread::Builder::new()
        .name("lull-metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    refresh();
                    let mut body = String::new();
                    let _ = encode(&mut body, &registry);
                    let header = tiny_http::Header::from_bytes(
                        "Content-Type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .expect("a valid static header");
                    tiny_http::Response::from_string(body).with_header(header)
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })
        .context("starting the metrics thread")?;
    Ok(())
}
