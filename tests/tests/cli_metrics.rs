//! `lull run --metrics`: every metric family the binary serves, on 127.0.0.1, in OpenMetrics
//! text, with the figures of the run that serves them.
//!
//! The run's JSON report goes to a FIFO, so lull blocks opening it once its figures are final
//! (after the last metrics update and the report's own reading of the engine). The metrics
//! page, still served then, is read at that moment and compared with the report.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command},
    time::{Duration, Instant},
};

use lull_tests::{
    Source, both_sources,
    cli::{scratch, source_flag, spawn_lull},
    serial,
    servers::free_port,
};
use serde_json::Value;

/// Every family `lull run --metrics` serves, with its OpenMetrics type. A family added to the
/// binary and not here, or gone from it, fails the test.
const FAMILIES: [(&str, &str); 11] = [
    ("lull_connections", "gauge"),
    ("lull_probes_sent", "counter"),
    ("lull_probes_answered", "counter"),
    ("lull_deaths", "counter"),
    ("lull_closed", "counter"),
    ("lull_wakeups", "counter"),
    ("lull_wakeups_found_traffic", "counter"),
    ("lull_detection_latency_seconds", "histogram"),
    ("lull_activity_source", "gauge"),
    ("lull_udp_flows", "gauge"),
    ("lull_udp_probes_sent", "counter"),
];

const CONNS: u64 = 300;

/// One read of the metrics page.
struct Page {
    /// Families declared by `# TYPE` lines: name -> type.
    types: BTreeMap<String, String>,
    /// Every sample: `name{labels}` -> value.
    samples: BTreeMap<String, f64>,
}

impl Page {
    /// `GET /metrics` on `127.0.0.1:port`; checks the status, content type and terminator.
    fn get(port: u16) -> std::io::Result<Self> {
        let mut conn = TcpStream::connect(("127.0.0.1", port))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
        let mut text = String::new();
        conn.read_to_string(&mut text)?;
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(
            head.starts_with("HTTP/1.") && head.contains(" 200 "),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/openmetrics-text"),
            "{head}"
        );
        assert_eq!(body.lines().last(), Some("# EOF"), "{body}");
        let mut page = Self {
            types: BTreeMap::new(),
            samples: BTreeMap::new(),
        };
        for line in body.lines() {
            if let Some(decl) = line.strip_prefix("# TYPE ") {
                let (name, kind) = decl.split_once(' ').expect("# TYPE name type");
                page.types.insert(name.into(), kind.into());
            } else if !line.starts_with('#') {
                let (key, value) = line.rsplit_once(' ').expect("a sample: key value");
                let value = value.parse().unwrap_or_else(|e| panic!("{line}: {e}"));
                assert!(page.samples.insert(key.into(), value).is_none(), "{line}");
            }
        }
        Ok(page)
    }

    /// The sample `key`, which must be there.
    fn get_sample(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in {:#?}", self.samples))
    }

    /// The samples of family `name` whose key starts with `name` + `suffix`, keyed by the
    /// rest of the key.
    fn series(&self, name: &str, suffix: &str) -> BTreeMap<String, f64> {
        let prefix = format!("{name}{suffix}");
        self.samples
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?.to_string(), *v)))
            .collect()
    }

    /// `lull_connections` by state.
    fn connections(&self, state: &str) -> f64 {
        self.get_sample(&format!("lull_connections{{state=\"{state}\"}}"))
    }
}

/// A `lull run` child, killed if the test ends before it does: blocked on a FIFO nobody
/// will open, it would otherwise never exit.
struct Lull(Option<Child>);

impl Lull {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("lull is running")
    }

    /// Waits (up to a minute) until lull's main thread is blocked opening the FIFO that
    /// `--json` names. False if it exited or never got there.
    fn blocked_on_fifo(&mut self) -> bool {
        let wchan = format!("/proc/{}/wchan", self.child().id());
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && matches!(self.child().try_wait(), Ok(None)) {
            if std::fs::read_to_string(&wchan).is_ok_and(|w| w.trim() == "wait_for_partner") {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits for lull to exit; panics with its stderr unless it succeeded.
    fn wait_success(mut self) {
        let out = self
            .0
            .take()
            .expect("lull is running")
            .wait_with_output()
            .expect("wait for lull");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Lull {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn as_f64(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

both_sources!(metrics_page_has_every_family_with_the_figures_of_the_run);
fn metrics_page_has_every_family_with_the_figures_of_the_run(source: Source) {
    let _serial = serial();
    let Some(flag) = source_flag(source, "metrics_page_has_every_family") else {
        return;
    };
    let json = scratch(&format!("metrics-{flag}.fifo"));
    let _ = std::fs::remove_file(&json);
    let made = Command::new("mkfifo").arg(&json).status().expect("mkfifo");
    assert!(made.success(), "mkfifo {}", json.display());
    let port = free_port();
    // No answering peers: once the hung peers are dead and the closing ones closed (by
    // duration - 1 s), no probe is sent and no verdict falls, so the counters of probes and
    // verdicts are final well before the run ends.
    let (conns, port_arg) = (CONNS.to_string(), port.to_string());
    let mut lull = Lull(Some(spawn_lull(&[
        "run",
        "--conns",
        &conns,
        "--duration",
        "6s",
        "--idle",
        "1s",
        "--interval",
        "300ms",
        "--count",
        "3",
        "--busy",
        "50",
        "--hung",
        "30",
        "--closing",
        "20",
        // TCP alone, so the page's totals are the report's; UDP's are checked in cli_udp.
        "--udp",
        "0",
        "--source",
        flag,
        "--quiet",
        "--metrics",
        &port_arg,
        "--json",
        json.to_str().expect("a UTF-8 path"),
    ])));

    // While it runs, the page is live: every connection shown, probes counted.
    let started = Instant::now();
    let mut live = None;
    while live.is_none() && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(200));
        live = Page::get(port).ok().filter(|p| {
            let shown: f64 = ["watching", "probing", "dead", "closed"]
                .iter()
                .filter(|s| {
                    p.samples
                        .contains_key(&format!("lull_connections{{state=\"{s}\"}}"))
                })
                .map(|s| p.connections(s))
                .sum();
            shown == CONNS as f64 && p.samples.get("lull_probes_sent_total") > Some(&0.0)
        });
    }
    let live = live.expect("the page never showed every connection and a probe sent");

    assert!(
        lull.blocked_on_fifo(),
        "lull never reached writing its report"
    );
    let end = Page::get(port).expect("the metrics page, read when the run was over");
    // Opening the FIFO lets lull write the report and finish.
    let text = std::fs::read_to_string(&json).expect("reading the report from the FIFO");
    let report: Value = serde_json::from_str(&text).expect("the report is JSON");
    lull.wait_success();
    let _ = std::fs::remove_file(&json);
    check_families(&end);
    check_against_report(&end, &report, flag);
    assert!(
        live.get_sample("lull_probes_sent_total") <= end.get_sample("lull_probes_sent_total"),
        "counters only grow"
    );
}

/// Exactly the families of [`FAMILIES`], each with its type.
fn check_families(page: &Page) {
    let want: BTreeMap<String, String> = FAMILIES
        .iter()
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect();
    assert_eq!(page.types, want, "the families served");
}

/// The page read at the end of the run against the report of the same run.
fn check_against_report(page: &Page, r: &Value, flag: &str) {
    assert_eq!(r["source"], flag.replace('-', "_"));
    assert_eq!(r["connections"], CONNS);
    assert_eq!(r["mismatches"].as_array().map(Vec::len), Some(0), "{r}");
    let (dead, closed) = (as_f64(&r["dead"]["found"]), as_f64(&r["closed"]["found"]));
    assert_eq!(
        (dead, closed),
        (90.0, 60.0),
        "30% hung and 20% closing of {CONNS}"
    );
    assert_eq!(r["revived"], 0);

    // The source in use is 1, any other 0.
    let sources = page.series("lull_activity_source", "");
    let on: Vec<_> = sources.iter().filter(|(_, v)| **v == 1.0).collect();
    assert_eq!(
        on,
        [(
            &format!("{{source=\"{}\"}}", r["source"].as_str().unwrap()),
            &1.0
        )],
        "{sources:?}"
    );
    assert!(
        sources.values().all(|v| *v == 0.0 || *v == 1.0),
        "{sources:?}"
    );

    // Verdicts and probes stopped long before the end: equal to the report.
    for (metric, field) in [
        ("lull_probes_sent_total", &r["probes_sent"]),
        ("lull_probes_answered_total", &r["probes_answered"]),
        ("lull_closed_total", &r["closed"]["found"]),
    ] {
        assert_eq!(page.get_sample(metric), as_f64(field), "{metric}");
    }
    // Deaths by the tier that caught them: both series exist, each equal to the report's.
    let deaths = page.series("lull_deaths_total", "");
    for tier in ["transport", "application"] {
        assert_eq!(
            deaths.get(&format!("{{tier=\"{tier}\"}}")).copied(),
            as_f64(&r["dead_by_tier"][tier]).into(),
            "lull_deaths_total{{tier={tier}}}: {deaths:?}"
        );
    }
    assert_eq!(deaths.len(), 2, "{deaths:?}");
    assert_eq!(deaths.values().sum::<f64>(), as_f64(&r["dead"]["found"]));
    assert!(page.get_sample("lull_probes_answered_total") > 0.0);
    assert_eq!(page.connections("dead"), dead, "dead and still watched");
    assert_eq!(
        page.connections("closed"),
        closed,
        "closed and still watched"
    );
    assert_eq!(
        page.connections("watching") + page.connections("probing"),
        CONNS as f64 - dead - closed,
        "the busy peers"
    );

    // Timers keep firing (busy peers, dead connections watched for a revival): the report
    // read the engine a moment after the last metrics update.
    for (metric, field) in [
        ("lull_wakeups_total", &r["wakeups"]),
        (
            "lull_wakeups_found_traffic_total",
            &r["wakeups_found_traffic"],
        ),
    ] {
        let (seen, reported) = (page.get_sample(metric), as_f64(field));
        assert!(
            seen > 0.0 && seen <= reported && reported - seen <= reported / 50.0 + 20.0,
            "{metric} {seen}, report {reported}"
        );
    }

    check_latency(page, &r["detection_latency"]);
}

/// The detection-latency histogram against the report's summary of the same detections.
fn check_latency(page: &Page, latency: &Value) {
    let name = "lull_detection_latency_seconds";
    let count = as_f64(&latency["count"]);
    assert_eq!(page.get_sample(&format!("{name}_count")), count);
    let buckets: Vec<(f64, f64)> = page
        .series(name, "_bucket")
        .into_iter()
        .map(|(labels, v)| {
            let le = labels
                .strip_prefix("{le=\"")
                .and_then(|l| l.strip_suffix("\"}"))
                .unwrap_or_else(|| panic!("bucket labels {labels}"));
            (le.parse().unwrap_or(f64::INFINITY), v)
        })
        .collect();
    let mut buckets = buckets;
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
    assert_eq!(buckets.last(), Some(&(f64::INFINITY, count)), "{buckets:?}");
    // Every detection took at most the report's maximum, and at least half took its median
    // or more (the report's figures come from a histogram of µs with a little rounding:
    // 1 ms and 1% of slack).
    let (max, p50) = (
        as_f64(&latency["max_ms"]) / 1e3,
        as_f64(&latency["p50_ms"]) / 1e3,
    );
    assert!(
        buckets
            .iter()
            .any(|(le, _)| *le >= max + 1e-3 && le.is_finite()),
        "a finite bucket above the maximum, {max} s: {buckets:?}"
    );
    for (le, n) in &buckets {
        if *le >= max + 1e-3 {
            assert_eq!(
                *n, count,
                "detections under {le} s; the slowest took {max} s"
            );
        }
        if *le < p50 * 0.99 {
            assert!(
                *n <= count / 2.0 + 1.0,
                "{n} of {count} detections under {le} s, but the median took {p50} s"
            );
        }
    }
    let sum = page.get_sample(&format!("{name}_sum"));
    assert!(
        sum <= count * (max + 1e-3) && sum >= count / 2.0 * p50 * 0.9,
        "sum {sum} s of {count} detections, p50 {p50} s, max {max} s"
    );
}
