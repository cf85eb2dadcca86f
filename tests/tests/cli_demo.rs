//! `lull run` (the demonstration) end to end: its report matches the population it started,
//! it stops cleanly on SIGINT, and it drops privileges with --user.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use lull_tests::{
    Source, both_sources,
    cli::{
        lull, lull_programs, lull_programs_of, report, scratch, source_flag, spawn_long_ebpf_demo,
        spawn_lull,
    },
    pins::KillOnDrop,
    root_or_skip, serial, wait_until,
};

both_sources!(demo_report_matches_the_population);
fn demo_report_matches_the_population(source: Source) {
    let _serial = serial();
    let Some(flag) = source_flag(source, "demo_report_matches_the_population") else {
        return;
    };
    let json = scratch(&format!("demo-{flag}.json"));
    let out = lull(&[
        "run",
        "--conns",
        "2000",
        "--duration",
        "10s",
        "--idle",
        "2s",
        "--interval",
        "500ms",
        "--count",
        "3",
        "--source",
        flag,
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("result: as expected"), "{stdout}");
    let r = report(&json);
    assert_eq!(r["source"], flag.replace('-', "_"));
    assert_eq!(r["connections"], 2000);
    assert_eq!(r["connections_by_role"]["hung"], 20);
    assert_eq!(r["dead"]["found"], 20);
    assert_eq!(r["dead"]["expected"], 20);
    assert_eq!(r["dead"]["unexpected"], 0);
    assert_eq!(r["closed"]["found"], 20);
    assert_eq!(r["closed"]["expected"], 20);
    assert_eq!(
        r["mismatches"].as_array().unwrap().len(),
        0,
        "{}",
        r["mismatches"]
    );
    let latency = &r["detection_latency"];
    assert!(
        latency["max_ms"].as_f64().unwrap() <= latency["bound_ms"].as_f64().unwrap() + 50.0,
        "{latency}"
    );
    assert!(
        r["probes_sent"].as_u64().unwrap() > 2000,
        "answering peers are probed"
    );
    assert!(
        r["wakeups_found_traffic"].as_u64().unwrap() > 0,
        "busy peers are re-armed, not probed"
    );
    assert!(r["engine_cpu_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn sigint_stops_cleanly_and_leaves_no_bpf_behind() {
    let _serial = serial();
    if !root_or_skip("sigint_stops_cleanly_and_leaves_no_bpf_behind") {
        return;
    }
    let child = KillOnDrop::new(spawn_long_ebpf_demo(500));
    let mut attached = HashSet::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            attached = lull_programs_of(child.id());
            attached.len() == 3
        }),
        "lull holds its three programs (ingress, sock_ops, and egress for UDP): {attached:?}"
    );
    // Into the run proper, past the connection setup.
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    child.signal(libc::SIGINT);
    let out = child
        .into_inner()
        .wait_with_output()
        .expect("wait for lull");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "SIGINT must stop the run promptly"
    );
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("(interrupted)"),
        "the final report is printed: {stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("activity source") && l.contains(" ebpf (")),
        "the run ended on eBPF: {stdout}"
    );
    let left: Vec<_> = lull_programs().intersection(&attached).copied().collect();
    assert!(left.is_empty(), "lull's programs {left:?} outlived it");
}

#[test]
fn user_drops_to_nobody_with_no_capabilities_and_keeps_working() {
    let _serial = serial();
    if !root_or_skip("user_drops_to_nobody_with_no_capabilities_and_keeps_working") {
        return;
    }
    let json = scratch("user.json");
    let child = KillOnDrop::new(spawn_lull(&[
        "run",
        "--conns",
        "500",
        "--duration",
        "7s",
        "--idle",
        "1s",
        "--interval",
        "300ms",
        "--source",
        "ebpf",
        "--user",
        "nobody",
        "--quiet",
        "--json",
        json.to_str().unwrap(),
    ]));
    std::thread::sleep(Duration::from_secs(3));
    let pid = child.id();
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("lull's threads") {
        let task = task.unwrap();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .to_string()
        };
        // Every thread: no uid 0, no usable capability.
        assert!(
            field("Uid:")
                .split_whitespace()
                .skip(1)
                .all(|u| u == "65534"),
            "{}",
            field("Uid:")
        );
        for caps in ["CapEff:", "CapPrm:", "CapAmb:"] {
            assert!(field(caps).ends_with("0000000000000000"), "{}", field(caps));
        }
        // The bounding set and no_new_privs only matter across execve, which only the main
        // thread does (it starts the peers); they are per-thread, so check them there.
        if task.file_name().to_str() == Some(pid.to_string().as_str()) {
            assert!(
                field("CapBnd:").ends_with("0000000000000000"),
                "{}",
                field("CapBnd:")
            );
            assert!(
                field("NoNewPrivs:").ends_with('1'),
                "{}",
                field("NoNewPrivs:")
            );
        }
        threads += 1;
    }
    assert!(threads >= 2, "the engine thread was checked too");
    let out = child
        .into_inner()
        .wait_with_output()
        .expect("wait for lull");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&json);
    assert_eq!(
        r["source"], "ebpf",
        "the programs stay attached after the drop"
    );
    assert_eq!(
        r["mismatches"].as_array().unwrap().len(),
        0,
        "{}",
        r["mismatches"]
    );
    assert_eq!(r["dead"]["found"], 5);
}
