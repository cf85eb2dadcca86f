//! Callback probes: lull decides *when* a connection needs a ping; the application sends it
//! (here, a line-protocol `PING` written by the application itself, as an HTTP/2 stack would send
//! its own PING frame). Any payload received afterwards answers it.
//!
//! ```text
//! cargo run --example callback
//! ```

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

use lull::{Engine, Event, Policy, Probe};

fn main() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || -> std::io::Result<()> {
        let (conn, _) = listener.accept()?;
        let mut writer = conn.try_clone()?;
        for line in BufReader::new(conn).lines() {
            writeln!(writer, "PONG to {}", line?)?;
        }
        Ok(())
    });

    let engine = Engine::builder().build()?;
    let policy = Policy::detect_dead(Duration::from_millis(300), Duration::from_millis(200), 2)
        .with_probe(Probe::Callback);
    let conn = TcpStream::connect(addr)?;
    conn.set_nodelay(true)?;
    let mut stream = engine.watch(conn, &policy)?;
    let mut pings = 0;
    while pings < 3 {
        match engine.events().recv_timeout(Duration::from_secs(2))? {
            Event::ProbeDue { id } if id == stream.id() => {
                pings += 1;
                // The application's own ping, in its own framing.
                stream.write_all(format!("PING {pings}\n").as_bytes())?;
                println!("lull asked for a ping; sent PING {pings}");
            }
            other => println!("event: {other:?}"),
        }
    }
    std::thread::sleep(Duration::from_millis(250));
    println!("{:?}", stream.stats());
    Ok(())
}
