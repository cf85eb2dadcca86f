//! Probes: what the engine sends to an idle connection, and how it sends it.

mod payload;
pub(crate) mod ring;

pub use payload::{MAX_DATAGRAM_PAYLOAD, MAX_PAYLOAD, Payload, PayloadError};
