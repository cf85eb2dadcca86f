//! `lull host --metrics ADDR`: host mode's figures in the Prometheus text format.
//!
//! The counters come from the kernel's own per-rule counts, read at each scrape: they count
//! every close since host mode was installed, including those while `lull host` was down,
//! and they survive restarts (a restart looks to Prometheus like time passing, not a reset).
//! The age histogram is fed by the verdicts this process reads.

use std::net::{SocketAddr, ToSocketAddrs as _};

use anyhow::{Result, anyhow};
use lull::host::{CountersReader, HostPaths, Verdict, VerdictKind};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleVerdict {
    rule: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The metrics, shared by the main loop and the HTTP thread.
pub struct HostMetrics {
    age: Family<RuleLabel, Histogram>,
    reloads: Family<ResultLabel, Counter>,
}

/// The metrics fed from the kernel's counters, refreshed at each scrape.
struct Kernel {
    paths: HostPaths,
    /// Opened at the first scrape that finds the pins (they appear when the host starts).
    reader: Option<CountersReader>,
    closed: Family<RuleVerdict, Counter>,
    watched: Family<RuleLabel, Gauge>,
    picked_up: Family<RuleLabel, Counter>,
    apply_failed: Family<RuleLabel, Counter>,
    lost: Family<RuleLabel, Counter>,
}

impl Kernel {
    /// Brings the kernel-fed metrics up to the kernel's counts.
    fn refresh(&mut self) {
        if self.reader.is_none() {
            self.reader = CountersReader::open(&self.paths).ok();
        }
        let Some(reader) = &self.reader else {
            return;
        };
        let (Ok(counters), Ok(names)) = (reader.read(), reader.names()) else {
            return;
        };
        let catch_up = |c: &Counter, total: u64| {
            let now = c.get();
            if total > now {
                c.inc_by(total - now);
            }
        };
        for (slot, c) in counters.iter().enumerate() {
            let name = &names[slot];
            if name.is_empty() && c.applied + c.picked_up == 0 {
                continue;
            }
            let rule = RuleLabel { rule: name.clone() };
            self.watched.get_or_create(&rule).set(c.watched() as i64);
            catch_up(&self.picked_up.get_or_create(&rule), c.picked_up);
            catch_up(&self.apply_failed.get_or_create(&rule), c.setsockopt_failed);
            catch_up(&self.lost.get_or_create(&rule), c.lost);
            for kind in VerdictKind::ALL {
                let labels = RuleVerdict {
                    rule: name.clone(),
                    verdict: kind.as_str(),
                };
                catch_up(
                    &self.closed.get_or_create(&labels),
                    c.closed[usize::from(kind.code())],
                );
            }
        }
    }
}

impl HostMetrics {
    /// Registers the metrics and serves them at `addr` on `/metrics`.
    pub fn serve(addr: &str, paths: &HostPaths) -> Result<Self> {
        let addr = parse_addr(addr)?;
        let server =
            tiny_http::Server::http(addr).map_err(|e| anyhow!("--metrics: binding {addr}: {e}"))?;
        let mut registry = Registry::with_prefix("lull_host");
        let metrics = Self {
            // 1 s to about 49 days, by factors of 4.
            age: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 4.0, 13))),
            reloads: Family::default(),
        };
        let kernel = Kernel {
            paths: paths.clone(),
            reader: None,
            closed: Family::default(),
            watched: Family::default(),
            picked_up: Family::default(),
            apply_failed: Family::default(),
            lost: Family::default(),
        };
        registry.register(
            "connections_closed",
            "Watched connections that ended, by rule and verdict (counted in the kernel, \
             including while lull host was down)",
            kernel.closed.clone(),
        );
        registry.register(
            "watched_connections",
            "Connections a rule watches now",
            kernel.watched.clone(),
        );
        registry.register(
            "picked_up",
            "Connections that existed before their rule and were picked up",
            kernel.picked_up.clone(),
        );
        registry.register(
            "apply_failures",
            "Connections a rule matched whose options or state callbacks could not all be set",
            kernel.apply_failed.clone(),
        );
        registry.register(
            "verdicts_lost",
            "Verdicts lost because the ring buffer was full (counted by their rule)",
            kernel.lost.clone(),
        );
        registry.register(
            "connection_age_seconds",
            "How long a connection was watched when it ended (read by this process)",
            metrics.age.clone(),
        );
        registry.register(
            "reloads",
            "Rule reloads (SIGHUP), by result",
            metrics.reloads.clone(),
        );
        let mut kernel = kernel;
        crate::metrics::serve_page(server, registry, move || kernel.refresh())?;
        tracing::info!("serving Prometheus metrics on http://{addr}/metrics");
        Ok(metrics)
    }

    /// Records a verdict this process read.
    pub fn observe(&self, v: &Verdict) {
        self.age
            .get_or_create(&RuleLabel {
                rule: v.rule.clone(),
            })
            .observe(v.age.as_secs_f64());
    }

    /// Records a reload.
    pub fn reloaded(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabel {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
    }
}

/// `ADDR` or a bare port (which binds 127.0.0.1: metrics leave the host only when asked).
fn parse_addr(text: &str) -> Result<SocketAddr> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| anyhow!("--metrics: `{text}` is not an address or a port"))
}
