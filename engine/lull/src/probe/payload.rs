//! Probe payloads: bytes the engine writes into an idle connection to make the peer answer.
//!
//! Every payload is tiny (at most [`MAX_PAYLOAD`] bytes) and stored once per engine, so a
//! thousand probes in one tick all point their `SEND` at the same buffer.

use std::fmt;

/// The largest payload lull sends. Probes must fit in one segment and one `send`, and a payload
/// that large is almost certainly a mistake.
pub const MAX_PAYLOAD: usize = 64;

/// The largest payload lull sends in one datagram (UDP flows), and the longest expected reply.
///
/// 1,200 bytes is what QUIC (RFC 9000, section 14) requires every path to carry: the IPv6
/// minimum MTU of 1,280 bytes, less the IPv6 and UDP headers, less room for a tunnel or two.
/// A keepalive datagram larger than that may be fragmented or dropped on the very paths it is
/// meant to keep open.
pub const MAX_DATAGRAM_PAYLOAD: usize = 1200;

/// A probe payload.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Payload {
    bytes: Box<[u8]>,
    name: &'static str,
}

/// Why a payload could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// The payload is empty.
    #[error("probe payload is empty")]
    Empty,
    /// The payload is longer than [`MAX_PAYLOAD`].
    #[error("probe payload is {len} bytes; the limit is {MAX_PAYLOAD}")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// A `hex:` payload is not hexadecimal.
    #[error("probe payload `hex:{text}` is not hex: {why}")]
    BadHex {
        /// What was given after `hex:`.
        text: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A datagram payload (or expected reply) is longer than [`MAX_DATAGRAM_PAYLOAD`].
    #[error(
        "datagram payload is {len} bytes; the limit is {MAX_DATAGRAM_PAYLOAD} (what every path \
         carries unfragmented)"
    )]
    DatagramTooLarge {
        /// Its length.
        len: usize,
    },
    /// A payload name lull does not know.
    #[error(
        "unknown probe `{0}`; expected redis, mqtt, http2, ws, ws-client, hex:<bytes>, kernel or callback"
    )]
    Unknown(String),
}

impl Payload {
    /// Arbitrary bytes.
    pub fn bytes(bytes: &[u8]) -> Result<Self, PayloadError> {
        if bytes.is_empty() {
            return Err(PayloadError::Empty);
        }
        if bytes.len() > MAX_PAYLOAD {
            return Err(PayloadError::TooLarge { len: bytes.len() });
        }
        Ok(Self {
            bytes: bytes.into(),
            name: "hex",
        })
    }

    /// Redis inline `PING\r\n`; the server answers `+PONG\r\n`.
    pub fn redis_ping() -> Self {
        Self::named(b"PING\r\n", "redis")
    }

    /// MQTT `PINGREQ` (`0xC0 0x00`); the broker answers `PINGRESP`. Brokers only accept it
    /// after `CONNECT`.
    pub fn mqtt_pingreq() -> Self {
        Self::named(&[0xC0, 0x00], "mqtt")
    }

    /// An HTTP/2 `PING` frame (type 6, no flags, stream 0) with 8 bytes of opaque data; the
    /// peer answers with a `PING` carrying the ACK flag. Only valid after the connection
    /// preface and `SETTINGS`.
    pub fn http2_ping() -> Self {
        Self::named(
            &[
                0x00, 0x00, 0x08, // length 8
                0x06, // type PING
                0x00, // flags
                0x00, 0x00, 0x00, 0x00, // stream 0
                b'l', b'u', b'l', b'l', b'p', b'i', b'n', b'g', // opaque data
            ],
            "http2",
        )
    }

    /// A WebSocket ping frame as a server sends it (unmasked, empty payload).
    pub fn ws_ping_server() -> Self {
        Self::named(&[0x89, 0x00], "ws")
    }

    /// A WebSocket ping frame as a client must send it: masked (RFC 6455 5.3), empty payload,
    /// with a fixed masking key. The key's job is to defeat proxy cache poisoning by
    /// unpredictable *payload* bytes; with an empty payload nothing is masked, so a fixed key
    /// is harmless.
    pub fn ws_ping_client() -> Self {
        Self::named(&[0x89, 0x80, 0x6c, 0x75, 0x6c, 0x6c], "ws-client")
    }

    /// Arbitrary bytes for a datagram flow, up to [`MAX_DATAGRAM_PAYLOAD`].
    pub fn datagram(bytes: &[u8]) -> Result<Self, PayloadError> {
        if bytes.is_empty() {
            return Err(PayloadError::Empty);
        }
        if bytes.len() > MAX_DATAGRAM_PAYLOAD {
            return Err(PayloadError::DatagramTooLarge { len: bytes.len() });
        }
        Ok(Self {
            bytes: bytes.into(),
            name: "hex",
        })
    }

    /// Parses a datagram payload: `hex:...` up to [`MAX_DATAGRAM_PAYLOAD`] bytes, or a
    /// ready-made name (as [`Payload::parse`]).
    pub fn parse_datagram(text: &str) -> Result<Self, PayloadError> {
        match text.strip_prefix("hex:") {
            Some(hex) => Self::datagram(&hex_bytes(hex, MAX_DATAGRAM_PAYLOAD)?),
            None => Self::parse(text),
        }
    }

    /// Parses `hex:...` text (pairs of hex digits; spaces, `:` and `_` between bytes are
    /// allowed).
    pub fn from_hex(text: &str) -> Result<Self, PayloadError> {
        Self::bytes(&hex_bytes(text, MAX_PAYLOAD)?)
    }

    /// The ready-made payload called `name`, or `hex:...`.
    pub fn parse(name: &str) -> Result<Self, PayloadError> {
        match name {
            "redis" => Ok(Self::redis_ping()),
            "mqtt" => Ok(Self::mqtt_pingreq()),
            "http2" => Ok(Self::http2_ping()),
            "ws" | "ws-server" => Ok(Self::ws_ping_server()),
            "ws-client" => Ok(Self::ws_ping_client()),
            _ => match name.strip_prefix("hex:") {
                Some(hex) => Self::from_hex(hex),
                None => Err(PayloadError::Unknown(name.chars().take(80).collect())),
            },
        }
    }

    fn named(bytes: &[u8], name: &'static str) -> Self {
        Self {
            bytes: bytes.into(),
            name,
        }
    }

    /// The bytes sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The ready-made name (`redis`, `mqtt`, ...), or `hex`.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The bytes of `hex:` text (its part after `hex:`), refusing more than `limit`.
fn hex_bytes(text: &str, limit: usize) -> Result<Vec<u8>, PayloadError> {
    let bad = |why| PayloadError::BadHex {
        text: text.chars().take(80).collect(),
        why,
    };
    let nibble = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    };
    let digits = text
        .bytes()
        .filter(|b| !matches!(b, b' ' | b':' | b'_'))
        .map(|b| nibble(b).ok_or_else(|| bad("contains a character that is not a hex digit")))
        .collect::<Result<Vec<u8>, _>>()?;
    if digits.len() % 2 == 1 {
        return Err(bad("odd number of hex digits"));
    }
    let len = digits.len() / 2;
    if len > limit {
        return Err(if limit > MAX_PAYLOAD {
            PayloadError::DatagramTooLarge { len }
        } else {
            PayloadError::TooLarge { len }
        });
    }
    Ok(digits.chunks_exact(2).map(|p| p[0] << 4 | p[1]).collect())
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.name)?;
        for b in self.bytes.iter() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_made_payloads_are_the_protocol_bytes() {
        let cases: &[(&str, &[u8])] = &[
            ("redis", b"PING\r\n"),
            ("mqtt", &[0xC0, 0x00]),
            ("ws", &[0x89, 0x00]),
            ("ws-client", &[0x89, 0x80, 0x6c, 0x75, 0x6c, 0x6c]),
        ];
        for (name, bytes) in cases {
            assert_eq!(Payload::parse(name).unwrap().as_bytes(), *bytes, "{name}");
        }
        let h2 = Payload::http2_ping();
        let b = h2.as_bytes();
        assert_eq!(b.len(), 9 + 8, "frame header + 8 bytes of opaque data");
        assert_eq!(u32::from_be_bytes([0, b[0], b[1], b[2]]), 8, "length field");
        assert_eq!((b[3], b[4]), (6, 0), "type PING, no ACK flag");
        assert_eq!(&b[5..9], &[0; 4], "stream 0");
        let ws = Payload::ws_ping_client();
        assert_eq!(
            ws.as_bytes()[1] & 0x80,
            0x80,
            "client frames must be masked"
        );
    }

    #[test]
    fn hex_payloads() {
        let cases: &[(&str, Result<&[u8], &str>)] = &[
            ("hex:00ff", Ok(&[0x00, 0xff])),
            ("hex:DE AD:be_ef", Ok(&[0xde, 0xad, 0xbe, 0xef])),
            ("hex:", Err("empty")),
            ("hex:abc", Err("odd")),
            ("hex:zz", Err("not a hex digit")),
            ("hex:é1", Err("not a hex digit")),
        ];
        for (text, want) in cases {
            match (Payload::parse(text), want) {
                (Ok(p), Ok(bytes)) => assert_eq!(p.as_bytes(), *bytes, "{text}"),
                (Err(e), Err(fragment)) => {
                    assert!(e.to_string().contains(fragment), "{text}: {e}")
                }
                (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
            }
        }
        let long = format!("hex:{}", "ab".repeat(MAX_PAYLOAD + 1));
        assert_eq!(
            Payload::parse(&long),
            Err(PayloadError::TooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
        assert!(matches!(
            Payload::parse("pingme"),
            Err(PayloadError::Unknown(_))
        ));
    }

    #[test]
    fn datagram_payloads_go_up_to_1200_bytes() {
        let at = |n: usize| format!("hex:{}", "ab".repeat(n));
        assert_eq!(
            Payload::parse_datagram(&at(MAX_DATAGRAM_PAYLOAD))
                .unwrap()
                .as_bytes()
                .len(),
            MAX_DATAGRAM_PAYLOAD
        );
        assert_eq!(
            Payload::parse_datagram(&at(MAX_DATAGRAM_PAYLOAD + 1)),
            Err(PayloadError::DatagramTooLarge {
                len: MAX_DATAGRAM_PAYLOAD + 1
            })
        );
        assert_eq!(
            Payload::parse(&at(MAX_PAYLOAD + 1)),
            Err(PayloadError::TooLarge {
                len: MAX_PAYLOAD + 1
            }),
            "TCP's limit is unchanged"
        );
        assert_eq!(Payload::parse_datagram("hex:"), Err(PayloadError::Empty));
        assert_eq!(
            Payload::parse_datagram("redis").unwrap(),
            Payload::redis_ping()
        );
    }
}

#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 100_000, failure_persistence: None, ..ProptestConfig::default() })]

        /// No probe name or `hex:` text panics the parser.
        #[test]
        fn any_text_parses_or_errs(text in "(hex:)?\\PC{0,140}") {
            let _ = Payload::parse(&text);
        }

        /// Every payload up to the limit round-trips through its hex form, with any separators.
        #[test]
        fn hex_round_trips(bytes in prop::collection::vec(any::<u8>(), 1..=MAX_PAYLOAD), sep in prop::sample::select(vec!["", " ", ":", "_"])) {
            let text: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
            let parsed = Payload::parse(&format!("hex:{}", text.join(sep))).unwrap();
            prop_assert_eq!(parsed.as_bytes(), &bytes[..]);
        }
    }
}
