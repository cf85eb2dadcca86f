use super::*;

/// The cgroup v2 root: a directory every rule in these tests can name. `None` (the tests then
/// check only what needs no cgroup) on hosts without cgroup v2.
fn root() -> Option<String> {
    cgroup2_root().ok().map(|p| p.display().to_string())
}

fn parse(text: &str) -> Result<Rules, RulesError> {
    Rules::parse(text, Path::new("rules.toml"))
}

fn error_at(text: &str) -> (usize, String) {
    match parse(text) {
        Err(RulesError::Invalid { line, reason, .. }) => (line, reason),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn reads_the_issue_example_and_friends() {
    let Some(root) = root() else { return };
    let text = format!(
        r#"
[[rule]]
name = "redis"
cgroup = "{root}"
local_ports = [6379, "7000-7010"]
remote_cidrs = ["10.1.2.3/8", "fd00::1/8", "192.168.1.1"]
idle = "30s"
interval = "5s"
count = 3
user_timeout = "45s"

[[rule]]
name = "rest"
cgroup = "."
off = true
"#
    );
    let rules = parse(&text).unwrap();
    assert_eq!(rules.rules.len(), 2);
    let r = &rules.rules[0];
    assert_eq!((r.name.as_str(), r.line), ("redis", 2));
    assert_eq!(r.local_ports, vec![6379..=6379, 7000..=7010]);
    assert_eq!(
        r.remote_cidrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.0.0.0/8", "fd00::/8", "192.168.1.1/32"]
    );
    assert_eq!(
        r.action,
        Action::Keepalive(Keepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(5),
            count: 3,
            user_timeout: Some(Duration::from_secs(45)),
        })
    );
    assert_eq!(rules.rules[1].action, Action::Off);
    assert_eq!(rules.rules[1].cgroup, Path::new(&root).join("."));
}

#[test]
fn refuses_bad_files_with_line_and_reason() {
    let Some(root) = root() else { return };
    let head = format!("[[rule]]\nname = \"a\"\ncgroup = \"{root}\"\n");
    let ka = "idle = \"30s\"\ninterval = \"5s\"\ncount = 3\n";
    let cases: Vec<(String, usize, &str)> = vec![
        (
            format!("{head}{ka}colour = 3\n"),
            7,
            "unknown field `colour`",
        ),
        (
            format!("{head}{ka}local_ports = [80, \"70-90\"]\n"),
            7,
            "70-90 overlaps 80",
        ),
        (
            format!("[[rule]]\nname = \"a\"\ncgroup = \"{root}/no-such-lull-cgroup\"\n{ka}"),
            3,
            "No such file",
        ),
        (
            format!("{head}idle = \"30 parsecs\"\ninterval = \"5s\"\ncount = 3\n"),
            4,
            "is not a duration",
        ),
        (
            format!("{head}idle = \"1500ms\"\ninterval = \"5s\"\ncount = 3\n"),
            4,
            "whole seconds",
        ),
        (
            format!("{head}idle = \"30s\"\ncount = 3\n"),
            1,
            "needs `interval`",
        ),
        (format!("{head}{ka}count2 = 1\n"), 7, "unknown field"),
        (
            format!("{head}{ka}\n[[rule]]\nname = \"a\"\ncgroup = \"{root}\"\n{ka}"),
            8,
            "used twice",
        ),
        (
            format!("{head}off = true\nidle = \"3s\"\n"),
            5,
            "no meaning",
        ),
        (
            format!("{head}{ka}remote_cidrs = [\"10.0.0.0/33\"]\n"),
            7,
            "prefix length",
        ),
        (
            format!("{head}{ka}local_ports = [0]\n"),
            7,
            "not 1 to 65535",
        ),
        (
            "[[rules]]\nname = \"a\"\n".into(),
            1,
            "unknown field `rules`",
        ),
        (format!("{head}{ka}idle = \"3s\"\n"), 7, "duplicate key"),
    ];
    for (text, line, reason) in cases {
        let (got_line, got_reason) = error_at(&text);
        assert!(
            got_line == line && got_reason.contains(reason),
            "{text}\n=> line {got_line}: {got_reason}\n(wanted line {line}: {reason})"
        );
    }
}

#[test]
fn an_error_names_the_file_line_and_column() {
    let Some(root) = root() else { return };
    let text = format!("[[rule]]\nname = \"a b\"\ncgroup = \"{root}\"\noff = true\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.starts_with("rules.toml:2:8: rule name `a b`"), "{err}");
}

#[test]
fn cidrs_map_ipv4_into_ipv6() {
    let c = parse_cidr("10.1.0.0/16").unwrap();
    let (bytes, prefix) = c.mapped();
    assert_eq!(prefix, 112);
    assert_eq!(&bytes[10..14], &[0xff, 0xff, 10, 1]);
    assert_eq!(parse_cidr("::/0").unwrap().mapped().1, 0);
    assert!(parse_cidr("300.1.1.1").is_err());
}
