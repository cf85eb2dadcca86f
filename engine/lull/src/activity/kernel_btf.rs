//! Byte offsets of kernel struct fields, read from the running kernel's BTF.
//!
//! lull's kernel programs are written in Rust, which has no CO-RE: a field such as
//! `struct sock::sk_err` cannot be relocated at load time the way libbpf relocates C. Instead
//! userspace reads the offsets from `/sys/kernel/btf/vmlinux` here and hands them to the
//! programs as read-only globals. The verifier treats a load from frozen `.rodata` as a
//! constant, so `ptr + offset` on a BTF pointer is checked against the kernel's own type
//! information, exactly as a CO-RE access would be.
//!
//! This reads only what lull needs: struct and union members, by name, through anonymous
//! members. aya-obj has a BTF parser, but it does not expose member offsets.

use std::path::Path;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// Why kernel BTF could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not BTF this reader understands.
    #[error("{path} is not little-endian BTF lull can read: {why}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A struct or member lull needs is not in this kernel's BTF.
    #[error("this kernel's BTF has no `{0}`")]
    Missing(String),
}

/// A kernel's BTF, indexed by type id.
pub struct KernelBtf {
    data: Vec<u8>,
    /// Start of the string section in `data`.
    strings: usize,
    /// Byte offset in `data` of each type's `struct btf_type`; index 0 is `void`.
    types: Vec<usize>,
}

impl KernelBtf {
    /// Reads the running kernel's BTF.
    pub fn load() -> Result<Self, BtfError> {
        Self::read(Path::new(VMLINUX_BTF))
    }

    /// Reads BTF from `path`.
    pub fn read(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data).map_err(|why| BtfError::Format {
            path: path.display().to_string(),
            why,
        })
    }

    fn parse(data: Vec<u8>) -> Result<Self, &'static str> {
        let u32_at = |at: usize| -> Result<u32, &'static str> {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or("truncated")
        };
        if data.len() < 24 || u16::from_le_bytes([data[0], data[1]]) != MAGIC {
            return Err("bad magic");
        }
        let header = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let strings = header + str_off;
        if strings + str_len > data.len() {
            return Err("string section out of bounds");
        }
        let mut types = vec![0];
        let mut at = header + type_off;
        let end = at + type_len;
        if end > data.len() {
            return Err("type section out of bounds");
        }
        while at < end {
            types.push(at);
            let info = u32_at(at + 4)?;
            let vlen = (info & 0xffff) as usize;
            // Each kind is a 12-byte `btf_type` followed by kind-specific data.
            at += 12
                + match (info >> 24) & 0x1f {
                    1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                    3 => 12,                      // ARRAY
                    4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                    6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                    2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, modifiers, FUNC, FLOAT, TYPE_TAG
                    _ => return Err("unknown type kind"),
                };
        }
        Ok(Self {
            data,
            strings,
            types,
        })
    }

    fn u32_at(&self, at: usize) -> u32 {
        // In bounds: every offset used here was checked while indexing in `parse`.
        let b = &self.data[at..at + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn name(&self, offset: u32) -> &str {
        let Some(tail) = self.data.get(self.strings + offset as usize..) else {
            return "";
        };
        let len = tail.iter().position(|&b| b == 0).unwrap_or(0);
        std::str::from_utf8(&tail[..len]).unwrap_or("")
    }

    fn kind(&self, id: u32) -> u32 {
        self.types
            .get(id as usize)
            .map_or(0, |&at| (self.u32_at(at + 4) >> 24) & 0x1f)
    }

    /// The byte offset of `path` (members separated by `.`, e.g. `icsk_ack.lrcvtime`) in
    /// `struct strukt`, looking through anonymous struct and union members on the way.
    pub fn offset_of(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        let missing = || BtfError::Missing(format!("struct {strukt}.{path}"));
        let mut id = (1..self.types.len() as u32)
            .find(|&id| {
                self.kind(id) == KIND_STRUCT
                    && self.name(self.u32_at(self.types[id as usize])) == strukt
            })
            .ok_or_else(missing)?;
        let mut offset = 0;
        for member in path.split('.') {
            let (at, ty) = self.member(id, member).ok_or_else(missing)?;
            offset += at;
            id = self.skip_modifiers(ty);
        }
        Ok(offset)
    }

    /// `member` of the struct or union `id`: its byte offset and type. Bitfields are skipped:
    /// a plain load cannot address them.
    fn member(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        let at = *self.types.get(id as usize)?;
        let info = self.u32_at(at + 4);
        let kind_flag = info >> 31 == 1;
        for i in 0..(info & 0xffff) as usize {
            let m = at + 12 + 12 * i;
            let (name, ty, raw) = (self.u32_at(m), self.u32_at(m + 4), self.u32_at(m + 8));
            // With kind_flag set, the top byte holds a bitfield size.
            let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
            if bits % 8 != 0 {
                continue;
            }
            if name != 0 && self.name(name) == member {
                return Some((bits / 8, ty));
            }
            let inner = self.skip_modifiers(ty);
            if name == 0
                && matches!(self.kind(inner), KIND_STRUCT | KIND_UNION)
                && let Some((off, ty)) = self.member(inner, member)
            {
                return Some((bits / 8 + off, ty));
            }
        }
        None
    }

    /// Follows typedefs and qualifiers (`volatile`, `const`, `restrict`, type tags) to the
    /// type they name.
    fn skip_modifiers(&self, mut id: u32) -> u32 {
        for _ in 0..16 {
            match self.kind(id) {
                8..=11 | 18 => {
                    id = self
                        .types
                        .get(id as usize)
                        .map_or(0, |&at| self.u32_at(at + 8))
                }
                _ => break,
            }
        }
        id
    }
}

/// The kernel struct fields lull's `sock_ops` program reads to classify a close, as byte
/// offsets into `struct tcp_sock` (which begins with `struct sock`, so a `sock` field has the
/// same offset in both).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `struct sock::sk_err`: why the kernel closed the socket (`ETIMEDOUT`, `ECONNRESET`).
    pub sk_err: u32,
    /// `struct inet_connection_sock::icsk_probes_out`: keepalive probes without an answer.
    pub probes_out: u32,
}

impl SockOffsets {
    /// Reads the offsets from this kernel's BTF.
    pub fn from_btf(btf: &KernelBtf) -> Result<Self, BtfError> {
        Ok(Self {
            sk_err: btf.offset_of("sock", "sk_err")?,
            probes_out: btf.offset_of("inet_connection_sock", "icsk_probes_out")?,
        })
    }
}

/// The running kernel's BTF for a test, or `None` (the test skips, saying so) where the
/// kernel has none, unless `LULL_REQUIRE_EBPF=1` makes that a failure. Kernel BTF comes with
/// every kernel that can run lull's eBPF source.
#[cfg(test)]
pub(crate) fn this_kernels_btf() -> Option<KernelBtf> {
    match KernelBtf::load() {
        Ok(btf) => Some(btf),
        Err(err) if std::env::var("LULL_REQUIRE_EBPF").as_deref() == Ok("1") => {
            panic!("LULL_REQUIRE_EBPF=1 but {err}")
        }
        Err(err) => {
            eprintln!("SKIPPED: {err}; set LULL_REQUIRE_EBPF=1 to fail instead");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_btf() {
        for (bytes, want) in [
            (vec![], "bad magic"),
            (vec![0u8; 24], "bad magic"),
            (
                {
                    let mut b = vec![0u8; 24];
                    b[..2].copy_from_slice(&MAGIC.to_le_bytes());
                    b[4..8].copy_from_slice(&24u32.to_le_bytes());
                    b[12..16].copy_from_slice(&100u32.to_le_bytes());
                    b
                },
                "type section out of bounds",
            ),
        ] {
            assert_eq!(KernelBtf::parse(bytes).err(), Some(want));
        }
    }

    /// The running kernel's offsets. `struct tcp_sock` begins with `inet_connection_sock`,
    /// which begins with `struct sock`: the program relies on that, so check it here.
    #[test]
    fn finds_the_fields_lull_reads_in_this_kernel() {
        let Some(btf) = this_kernels_btf() else {
            return;
        };
        let offsets = SockOffsets::from_btf(&btf).expect("sk_err and icsk_probes_out");
        assert_eq!(
            btf.offset_of("tcp_sock", "inet_conn.icsk_inet.sk.sk_err")
                .unwrap(),
            offsets.sk_err
        );
        assert_eq!(
            btf.offset_of("tcp_sock", "inet_conn.icsk_probes_out")
                .unwrap(),
            offsets.probes_out
        );
        assert!(
            offsets.sk_err > 0 && offsets.probes_out > offsets.sk_err,
            "{offsets:?}"
        );
        // Through an anonymous union of `struct sock_common`, and through a named member.
        assert!(btf.offset_of("sock_common", "skc_dport").is_ok());
        assert!(
            btf.offset_of("inet_connection_sock", "icsk_ack.lrcvtime")
                .is_ok()
        );
        assert!(matches!(
            btf.offset_of("sock", "no_such_field"),
            Err(BtfError::Missing(_))
        ));
    }
}
