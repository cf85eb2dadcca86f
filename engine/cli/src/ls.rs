//! `lull ls`: the connections a running `lull host` watches, like `ss -o` but from lull's
//! tables.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::{self, Write as _},
    process::ExitCode,
    time::Duration,
};

use anyhow::Result;
use clap::Args;
use lull::host::{Connection, HostPaths, Listing, Owner, list, owners, tcp_state_name};

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

pub fn run(args: &LsArgs) -> Result<ExitCode> {
    let paths = HostPaths::new(&args.instance);
    let listing = list(&paths)?;
    let rows: Vec<&Connection> = listing
        .connections
        .iter()
        .filter(|c| args.rule.is_empty() || args.rule.iter().any(|r| r == listing.rule(c.slot)))
        .filter(|c| {
            args.port.is_empty()
                || args
                    .port
                    .iter()
                    .any(|&p| c.local.port() == p || c.peer.port() == p)
        })
        .filter(|c| args.min_idle.is_none_or(|m| c.idle() >= m))
        .collect();
    let owners = if args.no_process {
        Owners::default()
    } else {
        owners(&paths)?
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(1 << 20, stdout.lock());
    if args.json {
        write_json(&mut out, &listing, &rows, &owners)?;
    } else {
        write_table(&mut out, &listing, &rows, &owners)?;
    }
    out.flush()?;
    drop(out);
    if listing.watched > listing.connections.len() as u64 || !listing.unreachable.is_empty() {
        eprintln!(
            "note: the kernel counts {} watched connection(s); {} listed from {} network \
             namespace(s){}",
            listing.watched,
            listing.connections.len(),
            listing.namespaces,
            if listing.unreachable.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} namespace(s) could not be entered: {}",
                    listing.unreachable.len(),
                    listing.unreachable[0].1
                )
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Socket cookie to the process holding it.
type Owners = HashMap<u64, Owner>;

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}`: {e} (use e.g. 30s, 5m, 250ms)"))
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Writes the JSON by hand: at a million rows, building a value tree per row would double
/// the time `lull ls` takes.
fn write_json(
    out: &mut impl io::Write,
    listing: &Listing,
    rows: &[&Connection],
    owners: &Owners,
) -> io::Result<()> {
    out.write_all(b"[")?;
    let mut line = String::with_capacity(512);
    for (i, c) in rows.iter().enumerate() {
        line.clear();
        if i > 0 {
            line.push(',');
        }
        let _ = write!(
            line,
            "\n{{\"cookie\":{},\"local\":\"{}\",\"peer\":\"{}\",\"rule\":{},\"idle_rx_s\":{},\
             \"idle_tx_s\":{},\"probes_out\":{},\"state\":\"{}\",\"watched_s\":{},\
             \"picked_up\":{},\"process\":",
            c.cookie,
            c.local,
            c.peer,
            serde_json::to_string(listing.rule(c.slot)).unwrap_or_default(),
            secs(c.idle_rx),
            secs(c.idle_tx),
            c.probes_out,
            tcp_state_name(c.state),
            secs(c.watched_for),
            c.picked_up,
        );
        match owners.get(&c.cookie) {
            Some(o) => {
                let _ = write!(
                    line,
                    "{{\"pid\":{},\"fd\":{},\"comm\":{}}}}}",
                    o.pid,
                    o.fd,
                    serde_json::to_string(&o.comm).unwrap_or_default()
                );
            }
            None => line.push_str("null}"),
        }
        out.write_all(line.as_bytes())?;
    }
    out.write_all(b"\n]\n")
}

fn write_table(
    out: &mut impl io::Write,
    listing: &Listing,
    rows: &[&Connection],
    owners: &Owners,
) -> io::Result<()> {
    writeln!(
        out,
        "{:<20} {:<28} {:<28} {:<16} {:<22} {:>9} {:>9} {:>6}  STATE",
        "COOKIE", "LOCAL", "PEER", "RULE", "PROCESS", "IDLE-RX", "IDLE-TX", "PROBES"
    )?;
    for c in rows {
        let proc = owners
            .get(&c.cookie)
            .map_or_else(|| "-".to_string(), |o| format!("{}[{}]", o.comm, o.pid));
        writeln!(
            out,
            "{:<20} {:<28} {:<28} {:<16} {:<22} {:>8.1}s {:>8.1}s {:>6}  {}",
            c.cookie,
            c.local,
            c.peer,
            listing.rule(c.slot),
            proc,
            c.idle_rx.as_secs_f64(),
            c.idle_tx.as_secs_f64(),
            c.probes_out,
            tcp_state_name(c.state)
        )?;
    }
    Ok(())
}
