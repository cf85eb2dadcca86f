//! [`Running`]: what a worker asks of a strategy, whichever it is. Each strategy (lull,
//! kernel keepalive, the naive tokio engine) implements it in its own module, and the worker
//! drives them all through it.

use std::{net::TcpStream, time::Duration};

use anyhow::Result;

use crate::proto::{Report, Role};

/// A strategy at work over the worker's connections.
pub trait Running {
    /// Puts one more connection, which plays `role`, under the strategy.
    fn add(&mut self, global: u64, role: Role, stream: TcpStream) -> Result<()>;
    /// Called once every connection is added, before READY.
    fn settle(&mut self, _conns: u64) -> Result<()> {
        Ok(())
    }
    /// Does the strategy's work (or lets its own threads do it) for about `wait`.
    fn poll(&mut self, wait: Duration) -> Result<()>;
    /// Probes sent so far, if the strategy counts them itself.
    fn probes(&self) -> Option<u64>;
    /// The window opens: note whatever [`Running::report`] reports as a difference.
    fn mark(&mut self) {}
    /// Verdicts and other endings so far.
    fn report(&self) -> Report;
    /// Something about the strategy worth printing (lull's activity source).
    fn detail(&self) -> String {
        String::new()
    }
    /// Lets go of everything before the worker exits, where that matters to anyone else
    /// (lull's shared attachment, whose last user detaches it).
    fn finish(self: Box<Self>) {}
}
