//! `lull run` with UDP flows (issue 14): `--connect udp://` keeping flows warm and finding
//! dead peers, checked at a real peer and in the report and the metrics; the demo's UDP share;
//! and bad input refused with one line and exit code 2.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use lull_harness::udp::{UDP_PROBE, UdpBehaviour, UdpPeer};
use lull_tests::{
    Source, both_sources,
    cli::{lull, lull_report, report, scratch, source_flag, spawn_lull},
    serial,
    servers::free_port,
};
use serde_json::Value;

/// `lull-ping` and `lull-pong`, as the flags spell them.
const PROBE: &str = "hex:6c756c6c2d70696e67";
const REPLY: &str = "hex:6c756c6c2d706f6e67";

fn observer(flag: &str) -> &'static str {
    if flag == "ebpf" { "ebpf" } else { "wrapper" }
}

#[test]
fn bad_udp_input_is_one_line_with_exit_code_2() {
    let too_long = format!("hex:{}", "ab".repeat(1_201));
    let just_fits = format!("hex:{}", "ab".repeat(1_200));
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec![
                "run",
                "--connect",
                "udp://no-such-host.invalid:4500",
                "--mode",
                "keep-warm",
                "--probe",
                PROBE,
            ],
            "--connect",
            "cannot be resolved",
        ),
        (
            vec!["run", "--connect", "udp://127.0.0.1:4500", "--probe", PROBE],
            "--expect-reply",
            "detect-dead without an expected reply",
        ),
        (
            vec![
                "run",
                "--connect",
                "udp://127.0.0.1:4500",
                "--mode",
                "keep-warm",
                "--probe",
                &too_long,
            ],
            "--probe",
            "a payload over 1200 bytes",
        ),
        (
            vec![
                "run",
                "--connect",
                "udp://127.0.0.1:4500",
                "--probe",
                PROBE,
                "--expect-reply",
                &too_long,
            ],
            "--expect-reply",
            "a reply over 1200 bytes",
        ),
        (
            vec![
                "run",
                "--connect",
                "udp://127.0.0.1:4500",
                "--mode",
                "keep-warm",
            ],
            "--probe",
            "no payload",
        ),
        (
            vec![
                "run",
                "--connect",
                "127.0.0.1:4500",
                "--expect-reply",
                REPLY,
            ],
            "--expect-reply",
            "an expected reply on TCP",
        ),
        (
            vec![
                "run",
                "--connect",
                "udp://127.0.0.1:4500",
                "--mode",
                "keep-warm",
                "--probe",
                PROBE,
                "--reconnect",
            ],
            "--reconnect",
            "reconnecting UDP",
        ),
        (
            vec![
                "run",
                "--connect",
                "udp://127.0.0.1:4500",
                "--probe",
                PROBE,
                "--expect-reply",
                REPLY,
                "--on-dead",
                "reset",
            ],
            "--on-dead",
            "a UDP reset",
        ),
    ];
    for (args, field, what) in cases {
        let out = lull(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{what}: one error line: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "{what}: nothing but the line: {stderr}"
        );
        assert!(
            errors[0].contains(field),
            "{what}: names {field}: {}",
            errors[0]
        );
    }
    // 1,200 bytes is allowed (this run fails later, at --duration, not at the payload).
    let out = lull(&[
        "run",
        "--connect",
        "udp://127.0.0.1:4500",
        "--mode",
        "keep-warm",
        "--probe",
        &just_fits,
        "--duration",
        "bogus",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--duration") && !stderr.contains("--probe"),
        "{stderr}"
    );
}

/// One scrape of the metrics page: `name{labels}` -> value.
fn scrape(port: u16) -> Option<BTreeMap<String, f64>> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

both_sources!(keep_warm_over_the_cli);
/// `--connect udp:// --mode keep-warm`: every flow (a port of its own at the peer) gets one
/// datagram per interval, all counted in the report and the metrics.
fn keep_warm_over_the_cli(source: Source) {
    let _serial = serial();
    let Some(flag) = source_flag(source, "udp keep-warm over the CLI") else {
        return;
    };
    let peer = UdpPeer::start(UdpBehaviour::silent());
    let target = format!("udp://{}", peer.addr());
    let json = scratch(&format!("udp-keep-warm-{flag}.json"));
    let metrics = free_port().to_string();
    let mut child = spawn_lull(&[
        "run",
        "--connect",
        &target,
        "--conns",
        "4",
        "--mode",
        "keep-warm",
        "--probe",
        PROBE,
        "--interval",
        "300ms",
        "--duration",
        "3s",
        "--source",
        flag,
        "--quiet",
        "--metrics",
        &metrics,
        "--json",
        json.to_str().unwrap(),
    ]);
    let port: u16 = metrics.parse().unwrap();
    let started = Instant::now();
    let mut live = None;
    while live.is_none() && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        live = scrape(port).filter(|m| m.get("lull_udp_probes_sent_total") > Some(&0.0));
    }
    let status = child.wait().expect("lull ran");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "{stderr}");
    let live = live.expect("the metrics page showed UDP probes");
    let label = format!("lull_udp_flows{{observer=\"{}\"}}", observer(flag));
    assert_eq!(live.get(&label), Some(&4.0), "{live:?}");
    let r = report(&json);
    let udp = &r["udp"];
    assert_eq!(udp["flows"], 4);
    assert_eq!(udp["observers"][observer(flag)], 4, "{udp}");
    assert_eq!(r["mismatches"].as_array().map(Vec::len), Some(0), "{r}");
    // At the peer: four flows, each on its own port, each about once per interval.
    let mut by_port: BTreeMap<u16, usize> = BTreeMap::new();
    for d in peer.datagrams().iter().filter(|d| d.bytes == UDP_PROBE) {
        *by_port.entry(d.from.port()).or_default() += 1;
    }
    assert_eq!(by_port.len(), 4, "{by_port:?}");
    assert!(
        by_port.values().all(|n| (7..=10).contains(n)),
        "3 s at one datagram per 300 ms: {by_port:?}"
    );
    assert_eq!(
        by_port.values().sum::<usize>() as u64,
        udp["probes_sent"].as_u64().unwrap(),
        "the report counts what the peer received"
    );
}

both_sources!(detect_dead_over_the_cli);
/// `--connect udp://` in detect-dead mode, three runs at once: a peer that answers (never
/// reported, its replies counted), one that stops answering (every flow reported dead within
/// the bound), and one that answers with the wrong bytes (flagged, exit code 3).
fn detect_dead_over_the_cli(source: Source) {
    let _serial = serial();
    let Some(flag) = source_flag(source, "udp detect-dead over the CLI") else {
        return;
    };
    let answering = UdpPeer::start(UdpBehaviour::answering());
    let hanging = UdpPeer::start(UdpBehaviour::answering());
    let wrong = UdpPeer::start(UdpBehaviour {
        reply: b"something else".to_vec(),
        ..UdpBehaviour::answering()
    });
    let run = |peer: &UdpPeer, name: &str| {
        let json = scratch(&format!("udp-dead-{name}-{flag}.json"));
        let target = format!("udp://{}", peer.addr());
        let child = spawn_lull(&[
            "run",
            "--connect",
            &target,
            "--conns",
            "3",
            "--probe",
            PROBE,
            "--expect-reply",
            REPLY,
            "--idle",
            "500ms",
            "--interval",
            "200ms",
            "--count",
            "3",
            "--duration",
            "5s",
            "--source",
            flag,
            "--quiet",
            "--json",
            json.to_str().unwrap(),
        ]);
        (child, json)
    };
    let runs = [
        run(&answering, "answering"),
        run(&hanging, "hanging"),
        run(&wrong, "wrong"),
    ];
    std::thread::sleep(Duration::from_secs(2));
    hanging.hang();
    let mut reports: Vec<(Option<i32>, Value)> = Vec::new();
    for (mut child, json) in runs {
        let status = child.wait().expect("lull ran");
        reports.push((status.code(), report(&json)));
    }
    let [(ok_code, ok), (dead_code, dead), (wrong_code, wrong_report)] =
        <[_; 3]>::try_from(reports).unwrap();

    assert_eq!(ok_code, Some(0), "{ok}");
    assert_eq!(
        ok["dead"]["found"], 0,
        "an answering peer was reported dead"
    );
    assert_eq!(ok["udp"]["dead"]["found"], 0);
    assert!(
        ok["udp"]["replies"].as_u64().unwrap() >= 3 * 4,
        "{}",
        ok["udp"]
    );
    assert_eq!(ok["udp"]["other_datagrams"], 0);
    assert_eq!(ok["udp"]["observers"][observer(flag)], 3);

    assert_eq!(dead_code, Some(0), "{dead}");
    assert_eq!(
        dead["dead"]["found"], 3,
        "every flow to the silent peer is dead"
    );
    let latency = &dead["detection_latency"];
    assert!(
        latency["max_ms"].as_f64().unwrap() <= latency["bound_ms"].as_f64().unwrap() + 50.0,
        "within the bound: {latency}"
    );
    assert_eq!(
        dead["mismatches"].as_array().map(Vec::len),
        Some(0),
        "{dead}"
    );

    assert_eq!(
        wrong_code,
        Some(3),
        "answers of the wrong protocol are flagged"
    );
    let mismatches = wrong_report["mismatches"].to_string();
    assert!(mismatches.contains("--expect-reply"), "{mismatches}");
    assert_eq!(
        wrong_report["dead"]["found"], 0,
        "any datagram is a sign of life"
    );
}

both_sources!(the_demo_holds_a_udp_share_beside_its_tcp_connections);
/// The demo's UDP flows are counted apart: its TCP figures are what they were, and the UDP
/// section finds every hung UDP peer, and sends nothing to busy ones.
fn the_demo_holds_a_udp_share_beside_its_tcp_connections(source: Source) {
    let _serial = serial();
    let Some(flag) = source_flag(source, "the demo's UDP share") else {
        return;
    };
    let r = lull_report(
        &[
            "run",
            "--conns",
            "400",
            "--udp",
            "25",
            "--busy",
            "10",
            "--hung",
            "4",
            "--idle",
            "2s",
            "--interval",
            "500ms",
            "--duration",
            "14s",
            "--source",
            flag,
            "--quiet",
        ],
        &scratch(&format!("udp-demo-{flag}.json")),
    );
    assert_eq!(r["connections"], 400);
    assert_eq!(
        r["dead"]["found"], 16,
        "the TCP figures are the TCP connections'"
    );
    assert_eq!(r["dead"]["expected"], 16);
    let udp = &r["udp"];
    assert_eq!(udp["flows"], 100);
    assert_eq!(udp["flows_by_role"]["busy"], 10);
    assert_eq!(udp["flows_by_role"]["hung"], 4);
    assert_eq!(udp["observers"][observer(flag)], 100, "{udp}");
    assert_eq!(udp["dead"]["found"], 4);
    assert_eq!(udp["dead"]["expected"], 4);
    assert_eq!(udp["dead"]["unexpected"], 0);
    assert_eq!(udp["busy_probes"], 0, "busy UDP flows drew probes");
    assert!(udp["replies"].as_u64().unwrap() > 0);
    assert_eq!(r["mismatches"].as_array().map(Vec::len), Some(0), "{r}");
}
