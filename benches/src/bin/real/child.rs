//! The orchestrator's handle on a child process of this binary: commands in on stdin, answers
//! out on stdout, stderr passed through. Dropping the handle closes stdin (the child's cue to
//! exit), waits a little, and kills it if it is still there, so an error anywhere leaves no
//! process behind.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub struct Kid {
    pub name: String,
    pub pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: flume::Receiver<String>,
}

impl Kid {
    /// Starts `current_exe() <args>`, after `configure` has had its say on the command.
    pub fn spawn(
        name: String,
        args: &[String],
        configure: impl FnOnce(&mut Command),
    ) -> Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        configure(&mut command);
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdout = child.stdout.take().context("child stdout")?;
        let (tx, lines) = flume::unbounded();
        // Ends at the child's EOF, which its exit guarantees.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            name,
            pid: child.id(),
            stdin: child.stdin.take(),
            child,
            lines,
        })
    }

    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin already closed")?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .with_context(|| format!("writing to {}", self.name))
    }

    /// The rest of the next line that starts with `word`, or of one starting with any of
    /// `also` (returned whole, so the caller can tell which). Other lines are ignored.
    pub fn expect(&mut self, word: &str, also: &[&str], timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(word) {
                        return Ok(rest.trim().to_string());
                    }
                    if also.iter().any(|a| line.starts_with(a)) {
                        return Ok(line);
                    }
                }
                Err(flume::RecvTimeoutError::Timeout) => {
                    bail!("{}: no {word} line within {timeout:?}", self.name)
                }
                Err(flume::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    bail!("{} exited ({status:?}) before saying {word}", self.name)
                }
            }
        }
    }

    /// Closes stdin and waits up to `grace` for the child to exit, then kills it.
    pub fn finish(&mut self, grace: Duration) {
        self.stdin = None;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        self.finish(Duration::from_secs(3));
    }
}
