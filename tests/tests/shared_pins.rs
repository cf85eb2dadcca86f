//! Processes on one host share one pinned set of programs and, per cgroup, one attachment; a
//! process killed with SIGKILL leaves nothing that stops the others, and the next one to start
//! reuses what it left (issue: the kernel half must pay for itself).

use std::{
    collections::HashSet,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc::{Receiver, channel},
    time::{Duration, Instant},
};

use lull::activity::{PIN_ROOT, cgroup_id};
use lull_harness::{Behaviour, PeerServer};
use lull_tests::{
    cgroups::TestCgroup,
    cli::lull_programs_of,
    pins::{KillOnDrop, Lease, leases_of, lock_holder, pinned_links, user_records},
    root_or_skip, serial,
};

/// How long a `pin_user` has for anything it is asked: it builds an engine, or opens a few
/// loopback connections.
const ANSWER: Duration = Duration::from_secs(10);

/// A `pin_user` process (tests/src/bin/pin_user.rs), killed if the test fails.
struct User {
    process: KillOnDrop,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Its links' kernel ids, as its engine reports them.
    links: String,
}

impl User {
    fn start(cgroup: &Path, peer: &PeerServer) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_pin_user"))
            .arg(cgroup)
            .arg(peer.addr().to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start pin_user");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut user = Self {
            process: KillOnDrop::new(child),
            stdin,
            lines,
            links: String::new(),
        };
        user.links = user
            .expect("ready links=")
            .trim_start_matches("ready links=")
            .to_string();
        user
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    /// The next line that starts with `prefix` (others, such as `dead` lines, are skipped).
    fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + ANSWER;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("pin_user {}: no `{prefix}` line: {e}", self.pid()),
            }
        }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        writeln!(stdin, "{command}").expect("write to pin_user");
    }

    /// Watches `n` connections to the peer; returns their ids.
    fn watch(&mut self, n: usize) -> Vec<String> {
        self.send(&format!("watch {n}"));
        let line = self.expect("watching ");
        line.split_whitespace().skip(1).map(String::from).collect()
    }

    /// Closes stdin, which ends the process cleanly, and waits for it.
    fn finish(mut self) {
        drop(self.stdin.take());
        let status = self.process.into_inner().wait().expect("wait for pin_user");
        assert!(status.success(), "pin_user ended with {status}");
    }
}

/// `/run/lull/<build>` of a user's record, and the build's pin directory.
fn build_of(pid: u32) -> (PathBuf, PathBuf) {
    let records = user_records(pid);
    assert_eq!(
        records.len(),
        1,
        "process {pid} has one record: {records:?}"
    );
    let run = records[0]
        .parent()
        .and_then(Path::parent)
        .expect("<build>/users/<pid>.<n>")
        .to_path_buf();
    let pins = Path::new(PIN_ROOT).join(run.file_name().expect("a build name"));
    (run, pins)
}

#[test]
fn processes_share_one_attachment_and_outlive_a_sigkilled_one() {
    let _serial = serial();
    if !root_or_skip("processes_share_one_attachment_and_outlive_a_sigkilled_one") {
        return;
    }
    let cgroup = TestCgroup::new("shared-pins");
    let silent = PeerServer::start(Behaviour::Silent);
    let mut a = User::start(cgroup.path(), &silent);
    a.watch(2);
    let mut b = User::start(cgroup.path(), &silent);
    b.watch(2);

    // One set of pins, the same programs, one pair of links on the cgroup.
    let (run, pins) = build_of(a.pid());
    assert_eq!(build_of(b.pid()), (run.clone(), pins.clone()), "one build");
    let programs = lull_programs_of(a.pid());
    assert_eq!(
        programs.len(),
        3,
        "ingress, sock_ops, and egress (loaded for UDP): {programs:?}"
    );
    assert_eq!(lull_programs_of(b.pid()), programs, "the same programs");
    assert_eq!(b.links, a.links, "the same two links");
    let id = cgroup_id(cgroup.path()).expect("the cgroup's id");
    let links = vec![format!("{id}-ingress"), format!("{id}-sock_ops")];
    assert_eq!(
        pinned_links(&pins),
        links,
        "ingress and sock_ops linked and pinned; no egress link without a UDP flow"
    );
    // Rows never collide: each process leases its own extents of the one table.
    let (a_leases, b_leases) = (leases_of(&run, a.pid()), leases_of(&run, b.pid()));
    assert!(!a_leases.is_empty() && !b_leases.is_empty());
    let paths =
        |leases: &[Lease]| -> HashSet<PathBuf> { leases.iter().map(|l| l.path.clone()).collect() };
    assert!(paths(&a_leases).is_disjoint(&paths(&b_leases)));
    let a_record = user_records(a.pid()).remove(0);

    a.process.kill(); // SIGKILL
    assert_eq!(lock_holder(&a_record), None, "the kernel dropped the lock");

    // The survivor keeps detecting: connections watched after the kill are reported dead.
    let after_kill: HashSet<String> = b.watch(3).into_iter().collect();
    let mut dead = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while dead.iter().filter(|d| after_kill.contains(*d)).count() < after_kill.len() {
        assert!(
            Instant::now() < deadline,
            "of {after_kill:?}, only {dead:?} reported dead"
        );
        let line = b.expect("dead ");
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.get(2), Some(&"application"), "{line}");
        dead.push(fields[1].to_string());
    }
    let reported: Vec<_> = dead.iter().filter(|d| after_kill.contains(*d)).collect();
    let distinct: HashSet<_> = reported.iter().collect();
    assert_eq!(
        reported.len(),
        distinct.len(),
        "each reported once: {dead:?}"
    );
    b.send("source");
    assert_eq!(
        b.expect("source "),
        "source ebpf",
        "the survivor is on eBPF"
    );
    assert_eq!(pinned_links(&pins), links, "the survivor's links stay");

    // A third process reuses the pins, the links and the dead one's extent, and its record is
    // gone.
    let mut c = User::start(cgroup.path(), &silent);
    c.watch(1);
    assert_eq!(lull_programs_of(c.pid()), programs, "the pinned programs");
    assert_eq!(c.links, a.links, "the cgroup's links");
    assert_eq!(pinned_links(&pins), links, "no new links");
    assert!(!a_record.exists(), "the dead process's record was removed");
    let c_leases = leases_of(&run, c.pid());
    for lease in &a_leases {
        let again = c_leases.iter().find(|l| l.path == lease.path);
        assert!(
            again.is_some_and(|l| l.epoch > lease.epoch),
            "the dead process's extent {lease:?} was not leased again: {c_leases:?}"
        );
    }

    // The last user of the cgroup takes its links away.
    b.finish();
    assert_eq!(pinned_links(&pins), links, "c still uses them");
    c.finish();
    assert!(
        pinned_links(&pins).iter().all(|l| !links.contains(l)),
        "the cgroup's last user unpinned its links: {:?}",
        pinned_links(&pins)
    );
}
