//! `pin_user CGROUP PEER`: one process using lull's pinned programs, for the tests that need
//! several (tests/tests/shared_pins.rs).
//!
//! It moves into `CGROUP`, builds an eBPF engine there (the default scope: the cgroup it runs
//! in), prints `ready links=<id>,<id>` and then obeys lines on stdin:
//! - `watch N`: opens N connections to `PEER`, watches them, prints `watching <id> ...`;
//! - `source`: prints `source <kind>`.
//!
//! Every `Dead` event is printed as `dead <id> <tier>`. It exits when stdin closes, dropping
//! its engine as any user of lull would.

use std::{
    io::BufRead,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use lull::{Engine, Event, Policy, SourceChoice, activity::move_self_to};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(cgroup), Some(peer)) = (args.next(), args.next()) else {
        bail!("usage: pin_user CGROUP PEER");
    };
    let peer: SocketAddr = peer.parse().context("PEER")?;
    move_self_to(&PathBuf::from(&cgroup))?;
    let engine = Engine::builder()
        .capacity(64)
        .source(SourceChoice::Ebpf)
        .build()
        .context("building an eBPF engine")?;
    let links: Vec<String> = engine
        .source()
        .link_ids()
        .iter()
        .map(u32::to_string)
        .collect();
    println!("ready links={}", links.join(","));

    let events = engine.events().clone();
    std::thread::spawn(move || {
        for event in events.iter() {
            if let Event::Dead { id, tier, .. } = event {
                println!("dead {id} {}", tier.name());
            }
        }
    });
    let policy = Policy::detect_dead(Duration::from_millis(500), Duration::from_millis(200), 2);
    let mut watched = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            ["watch", n] => {
                let mut ids = Vec::new();
                for _ in 0..n.parse::<usize>()? {
                    let w = engine.watch(TcpStream::connect(peer)?, &policy)?;
                    ids.push(w.id().to_string());
                    watched.push(w);
                }
                println!("watching {}", ids.join(" "));
            }
            ["source"] => println!("source {}", engine.source_kind()),
            _ => bail!("unknown command {line:?}"),
        }
    }
    drop(watched);
    engine.shutdown();
    Ok(())
}
