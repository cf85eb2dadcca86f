//! `lull run` refuses bad input with one line naming the field and exit code 2, never a
//! panic; the config file mirrors the flags, and flags win.

use lull_tests::cli::{lull, lull_report, scratch};

/// Runs `lull` and checks the refusal: exit code 2, one `error:` line naming `field`.
fn refused(args: &[&str], field: &str) -> String {
    let out = lull(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: exit code (stderr: {stderr})"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "{args:?}: want one error line, got: {stderr}"
    );
    assert!(
        errors[0].contains(field),
        "{args:?}: the error must name {field}: {}",
        errors[0]
    );
    errors[0].to_string()
}

#[test]
fn bad_flags_are_one_line_errors_naming_the_field() {
    let long_hex = format!("hex:{}", "ab".repeat(65));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run", "--count", "0"], "--count"),
        (vec!["run", "--count", "99"], "--count"),
        (vec!["run", "--idle", "0s"], "--idle"),
        (vec!["run", "--interval", "0ms"], "--interval"),
        (
            vec![
                "run",
                "--mode",
                "keep-warm",
                "--idle",
                "5s",
                "--interval",
                "10s",
            ],
            "--interval",
        ),
        (vec!["run", "--probe", "pigeon"], "--probe"),
        (vec!["run", "--probe", &long_hex], "--probe"),
        (vec!["run", "--probe", "hex:zz"], "--probe"),
        (
            vec!["run", "--probe", "kernel", "--idle", "500ms"],
            "--probe",
        ),
        (vec!["run", "--jitter", "0.9"], "--jitter"),
        (vec!["run", "--busy", "150"], "--busy"),
        (vec!["run", "--busy", "60", "--hung", "50"], "--busy"),
        (vec!["run", "--conns", "0"], "--conns"),
        (vec!["run", "--conns", "900000"], "--conns"),
        (vec!["run", "--idle", "soon"], "--idle"),
        (vec!["run", "--metrics", "not-an-address"], "--metrics"),
        (vec!["run", "--connect", "127.0.0.1:1"], "--connect"),
        (
            vec!["run", "--connect", "no.such.host.invalid:6379"],
            "--connect",
        ),
        (vec!["run", "--reconnect"], "--reconnect"),
        (vec!["run", "--engines", "0"], "--engines"),
    ];
    for (args, field) in cases {
        refused(&args, field);
    }
    let line = refused(&["run", "--probe", &long_hex], "--probe");
    assert!(line.contains("limit is 64"), "{line}");
}

#[test]
fn config_file_errors_name_the_file_or_field() {
    let missing = scratch("missing.toml");
    refused(&["run", "--config", missing.to_str().unwrap()], "--config");
    let unknown = scratch("unknown.toml");
    std::fs::write(&unknown, "idel = \"5s\"\n").unwrap();
    refused(&["run", "--config", unknown.to_str().unwrap()], "--config");
    let zero = scratch("zero.toml");
    std::fs::write(&zero, "count = 0\n").unwrap();
    refused(&["run", "--config", zero.to_str().unwrap()], "--count");
    let bad_duration = scratch("bad-duration.toml");
    std::fs::write(&bad_duration, "idle = \"forever\"\n").unwrap();
    refused(
        &["run", "--config", bad_duration.to_str().unwrap()],
        "--config",
    );
}

#[test]
fn config_file_mirrors_flags_and_flags_win() {
    let config = scratch("mirror.toml");
    std::fs::write(
        &config,
        "conns = 40\nidle = \"1s\"\ninterval = \"250ms\"\ncount = 2\nduration = \"2s\"\n\
         busy = 0\nhung = 0\nclosing = 0\nsource = \"tcp-info\"\nprobe = \"mqtt\"\nquiet = true\n",
    )
    .unwrap();
    let json = scratch("mirror.json");
    let r = lull_report(
        &[
            "run",
            "--config",
            config.to_str().unwrap(),
            "--conns",
            "30",
            "--interval",
            "300ms",
        ],
        &json,
    );
    assert_eq!(r["connections"], 30, "the flag wins over the file");
    assert_eq!(
        r["policy"]["interval_ms"], 300,
        "the flag wins over the file"
    );
    assert_eq!(r["policy"]["idle_ms"], 1000, "from the file");
    assert_eq!(r["policy"]["count"], 2, "from the file");
    assert_eq!(r["source"], "tcp_info", "from the file");
    assert!(
        r["policy"]["probe"].as_str().unwrap().starts_with("mqtt"),
        "{}",
        r["policy"]
    );
}

#[test]
fn help_comes_from_the_doc_comments() {
    let out = lull(&["run", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for text in [
        "--connect",
        "--mqtt-keepalive",
        "Durations read like 30s",
        "--metrics",
    ] {
        assert!(help.contains(text), "`lull run --help` lacks {text}");
    }
    let out = lull(&["--help"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Keep idle TCP connections alive"));
}

#[test]
fn hung_after_below_the_dead_bound_or_with_kernel_probes_names_both_settings() {
    // A short, small run if the check ever let these through, rather than the 30 s demo.
    // idle 2 s + 2 x 3 x 1 s: the transport's verdict needs 5 s, and the application tier's
    // probes 3 s more, so 7 s is too short.
    let short = [
        "run",
        "--conns",
        "10",
        "--duration",
        "1s",
        "--idle",
        "2s",
        "--interval",
        "1s",
        "--count",
        "3",
        "--hung-after",
        "7s",
    ];
    let line = refused(&short, "--hung-after");
    for setting in ["idle", "count", "interval", "8s"] {
        assert!(
            line.contains(setting),
            "names the dead bound's {setting}: {line}"
        );
    }
    let config = scratch("hung-after.toml");
    std::fs::write(
        &config,
        "idle = \"2s\"\ninterval = \"1s\"\ncount = 3\nhung_after = \"7s\"\nconns = 10\n\
         duration = \"1s\"\n",
    )
    .unwrap();
    refused(
        &["run", "--config", config.to_str().unwrap()],
        "--hung-after",
    );

    let line = refused(
        &[
            "run",
            "--conns",
            "10",
            "--duration",
            "1s",
            "--probe",
            "kernel",
            "--hung-after",
            "10m",
        ],
        "--hung-after",
    );
    assert!(
        line.contains("probe") && line.contains("kernel"),
        "names the probe setting too: {line}"
    );

    // The least allowed: idle 1 s + 2 x 2 x 1 s = 5 s.
    let json = scratch("hung-after-ok.json");
    let r = lull_report(
        &[
            "run",
            "--conns",
            "10",
            "--duration",
            "1s",
            "--idle",
            "1s",
            "--interval",
            "1s",
            "--count",
            "2",
            "--hung-after",
            "5s",
            "--source",
            "tcp-info",
            "--quiet",
            "--hung",
            "0",
            "--closing",
            "0",
        ],
        &json,
    );
    assert_eq!(r["connections"], 10);
}
