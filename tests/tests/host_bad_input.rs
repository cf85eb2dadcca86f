//! Host mode's bad input: rule files refused at startup with the file, line and reason (the
//! same check runs on SIGHUP, see host_lifecycle), and `lull ls` with no host running.

use std::process::Command;

use lull_tests::cli::{lull_bin, scratch};

/// Runs `lull host` on `rules`; returns (exit code, stderr, the file's path).
fn host_with(name: &str, rules: &str) -> (Option<i32>, String, String) {
    let path = scratch(&format!("{name}.toml"));
    std::fs::write(&path, rules).expect("write the rule file");
    let out = Command::new(lull_bin())
        .args(["host", "--config"])
        .arg(&path)
        .args(["--instance", &format!("bad{}", std::process::id())])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run lull host");
    let _ = std::fs::remove_file(&path);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

#[test]
fn bad_rule_files_are_refused_at_startup_with_file_line_and_reason() {
    let Ok(root) = lull::activity::cgroup2_root() else {
        eprintln!("SKIPPED: no cgroup v2 here");
        return;
    };
    let root = root.display();
    let rule = |extra: &str| {
        format!(
            "[[rule]]\nname = \"web\"\ncgroup = \"{root}\"\nidle = \"30s\"\ninterval = \"5s\"\n\
             count = 3\n{extra}"
        )
    };
    let cases = [
        (
            "unknown-key",
            rule("flavour = \"mint\"\n"),
            7,
            "unknown field `flavour`",
        ),
        (
            "overlap",
            rule("local_ports = [8080, \"8000-8100\"]\n"),
            7,
            "8000-8100 overlaps 8080",
        ),
        (
            "missing-cgroup",
            format!(
                "[[rule]]\nname = \"web\"\ncgroup = \"{root}/lull-no-such-cgroup\"\n\
                 idle = \"30s\"\ninterval = \"5s\"\ncount = 3\n"
            ),
            3,
            "No such file or directory",
        ),
        (
            "bad-duration",
            format!(
                "[[rule]]\nname = \"web\"\ncgroup = \"{root}\"\nidle = \"thirty\"\n\
                 interval = \"5s\"\ncount = 3\n"
            ),
            4,
            "`thirty` is not a duration",
        ),
    ];
    for (name, text, line, reason) in cases {
        let (code, stderr, path) = host_with(name, &text);
        assert_eq!(
            code,
            Some(2),
            "{name}: exit code 2 for bad input; stderr: {stderr}"
        );
        let want = format!("{path}:{line}:");
        assert!(
            stderr.contains(&want) && stderr.contains(reason),
            "{name}: wanted `{want}` and `{reason}` in: {stderr}"
        );
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{name}: one line: {stderr}"
        );
    }
}

#[test]
fn lull_ls_without_a_running_host_says_so_in_one_line_and_exits_1() {
    let out = Command::new(lull_bin())
        .args(["ls", "--instance", &format!("none{}", std::process::id())])
        .output()
        .expect("run lull ls");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no `lull host` is running"), "{stderr}");
}
