//! An engine group: one engine per core, one shared eBPF table and event channel. Connections
//! are spread over the engines; a group is used exactly like one engine.
//!
//! ```text
//! cargo run --example group
//! ```

use std::{
    net::{TcpListener, TcpStream},
    time::Duration,
};

use lull::{EngineGroup, Event, Policy};

fn main() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    // Accepts and holds every connection without ever answering: all of them will be dead.
    std::thread::spawn(move || listener.incoming().flatten().collect::<Vec<_>>());

    let group = EngineGroup::builder().engines(2).build()?;
    let policy = Policy::detect_dead(Duration::from_millis(200), Duration::from_millis(100), 2);
    let streams = (0..1_000)
        .map(|_| {
            group
                .watch(TcpStream::connect(addr)?, &policy)
                .map_err(Into::into)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut dead = 0;
    while dead < streams.len() {
        if let Event::Dead { .. } = group.events().recv_timeout(Duration::from_secs(2))? {
            dead += 1;
        }
    }
    println!(
        "{} engines, source {}: {dead} dead",
        group.len(),
        group.source_kind()
    );
    for (k, stats) in group.engine_stats().iter().enumerate() {
        println!(
            "engine {k}: watched {}, probes {}, dead {}",
            stats.watched, stats.probes_sent, stats.dead
        );
    }
    Ok(())
}
