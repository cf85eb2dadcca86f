//! Dead-peer detection on plain blocking `std` streams.
//!
//! Starts two loopback peers: one answers `PING` with `+PONG`, one accepts and then hangs (it
//! never reads or writes, while its kernel keeps ACKing). lull keeps the first alive and reports
//! the second dead after `idle + count * interval`.
//!
//! ```text
//! cargo run --example detect_dead
//! ```

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use lull::{Engine, Event, Payload, Policy, Probe};

fn main() -> anyhow::Result<()> {
    let healthy = peer(true)?;
    let hung = peer(false)?;
    let engine = Engine::builder().build()?;
    println!("activity source: {}", engine.source_kind());

    let policy = Policy::detect_dead(Duration::from_millis(500), Duration::from_millis(200), 3)
        .with_probe(Probe::Bytes(Payload::redis_ping()));
    let start = Instant::now();
    let alive = engine.watch(TcpStream::connect(healthy)?, &policy)?;
    let stuck = engine.watch(TcpStream::connect(hung)?, &policy)?;
    println!(
        "watching {} (answers) and {} (hangs); bound {:?}",
        alive.id(),
        stuck.id(),
        policy.detection_bound()
    );

    while let Ok(event) = engine.events().recv_timeout(Duration::from_secs(3)) {
        println!("{:>8.3?}  {event:?}", start.elapsed());
        if matches!(event, Event::Dead { id, .. } if id == stuck.id()) {
            break;
        }
    }
    println!("healthy peer: {:?}", alive.stats());
    println!("hung peer:    {:?}", stuck.stats());
    Ok(())
}

/// A loopback peer that answers every read with `+PONG`, or never does anything.
fn peer(answers: bool) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0; 64];
                while answers && matches!(conn.read(&mut buf), Ok(n) if n > 0) {
                    let _ = conn.write_all(b"+PONG\r\n");
                }
                std::thread::park();
            });
        }
    });
    Ok(addr)
}
