//! `lull ls`: the connections a running `lull host` watches, like `ss -o` but from lull's
//! tables.
//!
//! It must be fast at a million rows, so it streams: the kernel's list iterator is read on
//! threads of its own while this thread formats the rows it has (after the owners iterator,
//! which runs at the same time, has said which process holds which socket), and the JSON is
//! written by hand, with integer formatting, rather than through a value per row.

use std::{
    collections::HashMap,
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::Args;
use lull::host::{
    Connection, HostError, HostPaths, ListSummary, Owner, list_each, owners, tcp_state_name,
};

/// List the connections a running `lull host` watches.
///
/// Columns: socket cookie, local and peer address, rule, owning process, seconds since a
/// segment was received and since data was sent (the kernel's own stamps), keepalive probes
/// unanswered, and TCP state. Exits 1, with one line, when no `lull host` runs.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print one JSON array of objects instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Only connections of this rule (repeatable).
    #[arg(long, value_name = "NAME")]
    pub rule: Vec<String>,
    /// Only connections with this local or remote port (repeatable).
    #[arg(long, value_name = "PORT")]
    pub port: Vec<u16>,
    /// Only connections idle (no segment either way) at least this long, e.g. 30s.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub min_idle: Option<Duration>,
    /// Skip finding each socket's process (one more kernel iterator run, over every open
    /// file on the host).
    #[arg(long)]
    pub no_process: bool,
    /// Instance name, as given to `lull host --instance`.
    #[arg(long, value_name = "NAME", default_value = "host")]
    pub instance: String,
}

/// Socket cookie to the process holding it.
type Owners = HashMap<u64, Owner>;

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}`: {e} (use e.g. 30s, 5m, 250ms)"))
}

pub fn run(args: &LsArgs) -> Result<ExitCode> {
    let paths = HostPaths::new(&args.instance);
    // Before anything is printed: without a host, the one line on stderr is all.
    if lull::host::running(&paths).is_none() {
        return Err(HostError::NotRunning {
            instance: paths.instance.clone(),
            lock: paths.lock.clone(),
        }
        .into());
    }
    // The owners iterator runs while the list is read; the first row waits for it.
    let mut pending: Option<JoinHandle<Result<Owners, HostError>>> =
        (!args.no_process).then(|| {
            let paths = paths.clone();
            std::thread::spawn(move || owners(&paths))
        });
    let mut owners_map = Owners::new();
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let mut line = String::with_capacity(512);
    let mut rows = 0u64;
    let mut failure: Option<anyhow::Error> = None;
    if args.json {
        out.write_all(b"[")?;
    } else {
        writeln!(
            out,
            "{:<20} {:<28} {:<28} {:<16} {:<22} {:>9} {:>9} {:>6}  STATE",
            "COOKIE", "LOCAL", "PEER", "RULE", "PROCESS", "IDLE-RX", "IDLE-TX", "PROBES"
        )?;
    }
    let summary = list_each(&paths, |c, rule| {
        if failure.is_some() {
            return;
        }
        if let Some(handle) = pending.take() {
            match handle.join().expect("the owners thread panicked") {
                Ok(map) => owners_map = map,
                Err(err) => failure = Some(anyhow::Error::new(err)),
            }
        }
        let keep = (args.rule.is_empty() || args.rule.iter().any(|r| r == rule))
            && (args.port.is_empty()
                || args
                    .port
                    .iter()
                    .any(|&p| c.local.port() == p || c.peer.port() == p))
            && args.min_idle.is_none_or(|m| c.idle() >= m);
        if !keep {
            return;
        }
        line.clear();
        let owner = owners_map.get(&c.cookie);
        if args.json {
            json_row(&mut line, rows == 0, c, rule, owner);
        } else {
            table_row(&mut line, c, rule, owner);
        }
        rows += 1;
        if let Err(err) = out.write_all(line.as_bytes()) {
            failure = Some(anyhow::Error::new(err).context("writing to stdout"));
        }
    })?;
    let tail = if args.json { &b"\n]\n"[..] } else { b"" };
    let written = match failure {
        Some(err) => Err(err),
        None => out
            .write_all(tail)
            .and_then(|()| out.flush())
            .context("writing to stdout"),
    };
    drop(out);
    if let Err(err) = written {
        // `lull ls | head` closes the pipe early: that is not an error.
        if err
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
        {
            return Ok(ExitCode::SUCCESS);
        }
        return Err(err);
    }
    note_missing(&summary, rows, args);
    Ok(ExitCode::SUCCESS)
}

/// Says on stderr when the kernel counts more watched connections than were listed.
fn note_missing(summary: &ListSummary, rows: u64, args: &LsArgs) {
    let filtered = !args.rule.is_empty() || !args.port.is_empty() || args.min_idle.is_some();
    if (!filtered && summary.watched > rows) || !summary.unreachable.is_empty() {
        eprintln!(
            "note: the kernel counts {} watched connection(s); {rows} listed from {} network \
             namespace(s){}",
            summary.watched,
            summary.namespaces,
            summary
                .unreachable
                .first()
                .map(|(ns, why)| format!(
                    "; {} namespace(s) could not be read ({}: {why})",
                    summary.unreachable.len(),
                    ns.path.display()
                ))
                .unwrap_or_default()
        );
    }
}

fn json_row(line: &mut String, first: bool, c: &Connection, rule: &str, owner: Option<&Owner>) {
    line.push_str(if first {
        "\n{\"cookie\":"
    } else {
        ",\n{\"cookie\":"
    });
    push_u64(line, c.cookie);
    line.push_str(",\"local\":\"");
    push_addr(line, &c.local);
    line.push_str("\",\"peer\":\"");
    push_addr(line, &c.peer);
    line.push_str("\",\"rule\":");
    push_json_str(line, rule);
    line.push_str(",\"idle_rx_s\":");
    push_secs(line, c.idle_rx);
    line.push_str(",\"idle_tx_s\":");
    push_secs(line, c.idle_tx);
    line.push_str(",\"probes_out\":");
    push_u64(line, u64::from(c.probes_out));
    line.push_str(",\"state\":\"");
    line.push_str(tcp_state_name(c.state));
    line.push_str("\",\"watched_s\":");
    push_secs(line, c.watched_for);
    line.push_str(if c.picked_up {
        ",\"picked_up\":true,\"process\":"
    } else {
        ",\"picked_up\":false,\"process\":"
    });
    match owner {
        Some(o) => {
            line.push_str("{\"pid\":");
            push_u64(line, u64::from(o.pid));
            line.push_str(",\"fd\":");
            push_u64(line, u64::from(o.fd));
            line.push_str(",\"comm\":");
            push_json_str(line, &o.comm);
            line.push_str("}}");
        }
        None => line.push_str("null}"),
    }
}

fn table_row(line: &mut String, c: &Connection, rule: &str, owner: Option<&Owner>) {
    use std::fmt::Write as _;
    let process = owner.map_or_else(|| "-".to_string(), |o| format!("{}[{}]", o.comm, o.pid));
    let _ = writeln!(
        line,
        "{:<20} {:<28} {:<28} {:<16} {:<22} {:>8.1}s {:>8.1}s {:>6}  {}",
        c.cookie,
        c.local,
        c.peer,
        rule,
        process,
        c.idle_rx.as_secs_f64(),
        c.idle_tx.as_secs_f64(),
        c.probes_out,
        tcp_state_name(c.state)
    );
}

fn push_u64(line: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // The digits are ASCII.
    line.push_str(std::str::from_utf8(&digits[i..]).unwrap_or("0"));
}

/// Seconds with millisecond precision, as `12.345`.
fn push_secs(line: &mut String, d: Duration) {
    let ms = d.as_millis() as u64;
    push_u64(line, ms / 1000);
    let frac = ms % 1000;
    line.push('.');
    line.push((b'0' + (frac / 100) as u8) as char);
    line.push((b'0' + (frac / 10 % 10) as u8) as char);
    line.push((b'0' + (frac % 10) as u8) as char);
}

fn push_addr(line: &mut String, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    line.push('.');
                }
                push_u64(line, u64::from(*octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write as _;
            let _ = write!(line, "[{v6}]");
        }
    }
    line.push(':');
    push_u64(line, u64::from(addr.port()));
}

fn push_json_str(line: &mut String, s: &str) {
    // Rule names are checked to be plain ASCII; command names can be anything.
    if s.bytes()
        .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ')
    {
        line.push('"');
        line.push_str(s);
        line.push('"');
    } else {
        line.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"?\"".into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_valid_json_with_the_issue_keys() {
        let c = Connection {
            cookie: 18_446_744_073_709_551_615,
            local: "10.0.0.1:6379".parse().unwrap(),
            peer: "[fd00::1]:50000".parse().unwrap(),
            slot: 0,
            idle_rx: Duration::from_millis(1_005),
            idle_tx: Duration::from_millis(62_050),
            probes_out: 2,
            state: 1,
            picked_up: true,
            watched_for: Duration::from_secs(3),
            netns: 0,
        };
        let owner = Owner {
            pid: 7,
            fd: 9,
            comm: "redis \"srv\"".into(),
        };
        let mut line = String::from("[");
        json_row(&mut line, true, &c, "redis", Some(&owner));
        json_row(&mut line, false, &c, "r", None);
        line.push_str("\n]");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let row = &v[0];
        assert_eq!(row["cookie"].as_u64(), Some(u64::MAX));
        assert_eq!(row["local"], "10.0.0.1:6379");
        assert_eq!(row["peer"], "[fd00::1]:50000");
        assert_eq!(row["idle_rx_s"].as_f64(), Some(1.005));
        assert_eq!(row["idle_tx_s"].as_f64(), Some(62.05));
        assert_eq!(row["state"], "ESTABLISHED");
        assert_eq!(row["process"]["comm"], "redis \"srv\"");
        assert!(v[1]["process"].is_null());
    }
}
