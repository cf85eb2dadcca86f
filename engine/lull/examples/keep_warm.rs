//! WireGuard-style keep-warm: one small probe whenever nothing was sent for an interval, so a
//! NAT or firewall between client and server never forgets the flow. Never reports dead.
//!
//! ```text
//! cargo run --example keep_warm
//! ```

use std::{
    io::Read,
    net::{TcpListener, TcpStream},
    time::Duration,
};

use lull::{Engine, Payload, Policy, Probe};

fn main() -> anyhow::Result<()> {
    // A peer that reads and never replies, like a server that only cares about state.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let counter = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_millis(1_200)))?;
        let mut total = 0;
        let mut buf = [0; 64];
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        Ok(total)
    });

    let engine = Engine::builder().build()?;
    let policy = Policy::keep_warm(Duration::from_millis(100))
        .with_probe(Probe::Bytes(Payload::mqtt_pingreq()));
    let stream = engine.watch(TcpStream::connect(addr)?, &policy)?;
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "probes sent in 1 s at a 100 ms interval: {}",
        stream.stats().probes_sent
    );
    // Closing the stream ends the peer's count.
    drop(stream);
    let bytes = counter.join().expect("counter thread")?;
    println!("bytes the peer received: {bytes} (2 per MQTT PINGREQ)");
    Ok(())
}
