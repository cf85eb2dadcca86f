//! `lull ls`: the watched connections of a running host, read from the kernel.
//!
//! The rows come from the pinned list iterator (`<pins>/list`), opened like a file once per
//! network namespace: the kernel walks its TCP tables and writes a fixed-size binary record
//! for each watched socket, so a million rows cost a few thousand `read` calls, and no
//! per-row system call. Idle times come from the kernel's own jiffies stamps, which cost
//! nothing per packet.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use aya::maps::{Array, Map, MapData, PerCpuArray};
use lull_common::host::{
    ClockRecord, HOST_CONFIG_MAP, HOST_COUNTERS_MAP, HOST_NAMES_MAP, HostConfig, ListRecord,
    OwnerRecord, RULE_SLOTS, RuleCounters, RuleName, sock_flags,
};

use super::{
    HostError, HostPaths, iter,
    netns::{self, Netns},
    running, tables,
    verdict::socket_addr,
};

/// One watched connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Socket cookie.
    pub cookie: u64,
    /// Local address.
    pub local: SocketAddr,
    /// Peer address.
    pub peer: SocketAddr,
    /// Its rule's slot; [`Listing::rule`] names it.
    pub slot: u16,
    /// Since the last segment was received.
    pub idle_rx: Duration,
    /// Since data was last sent.
    pub idle_tx: Duration,
    /// Keepalive probes sent and not answered yet.
    pub probes_out: u8,
    /// TCP state (see [`super::tcp_state_name`]).
    pub state: u8,
    /// The socket's inode (as `ss -e` shows it as `ino:`; 0 once no file refers to it).
    pub inode: u64,
    /// Whether it was picked up after establishment.
    pub picked_up: bool,
    /// How long the rule has watched it.
    pub watched_for: Duration,
    /// Its network namespace's inode.
    pub netns: u64,
}

impl Connection {
    /// Time since the last activity either way.
    pub fn idle(&self) -> Duration {
        self.idle_rx.min(self.idle_tx)
    }
}

/// Everything `lull ls` shows.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The watched connections.
    pub connections: Vec<Connection>,
    /// Rule names, by slot.
    pub rules: Vec<String>,
    /// Connections the kernel counts as watched (applied or picked up, minus closed). More
    /// than `connections.len()` means some could not be listed (see `unreachable`).
    pub watched: u64,
    /// Network namespaces listed.
    pub namespaces: usize,
    /// Network namespaces that could not be entered, and why.
    pub unreachable: Vec<(Netns, String)>,
}

impl Listing {
    /// The name of the rule in `slot`.
    pub fn rule(&self, slot: u16) -> &str {
        self.rules
            .get(usize::from(slot))
            .map_or("?", String::as_str)
    }
}

/// Lists the watched connections of instance `paths`. Fails with [`HostError::NotRunning`]
/// when no `lull host` runs it.
pub fn list(paths: &HostPaths) -> Result<Listing, HostError> {
    if running(paths).is_none() {
        return Err(HostError::NotRunning {
            instance: paths.instance.clone(),
            lock: paths.lock.clone(),
        });
    }
    let link = paths.list_link();
    if !link.exists() {
        return Err(HostError::NotInstalled {
            dir: paths.pins.clone(),
        });
    }
    let config: Array<MapData, HostConfig> =
        open_map(&paths.map(HOST_CONFIG_MAP), HOST_CONFIG_MAP)?;
    let hz = config
        .get(&0, 0)
        .map_err(|source| HostError::Map {
            name: HOST_CONFIG_MAP,
            source,
        })?
        .hz
        .max(1);
    let counters = CountersReader::open(paths)?;
    let rules = counters.names()?;
    let watched = counters.read()?.iter().map(RuleCounters::watched).sum();

    let namespaces = netns::all();
    let runs = netns::each(&namespaces, || {
        let file = std::fs::File::open(&link)
            .map_err(|e| HostError::syscall(format!("open {}", link.display()), e))?;
        iter::read_all(file, "list")
    });
    let jiffy_ns = 1_000_000_000 / u64::from(hz);
    let mut listing = Listing {
        connections: Vec::new(),
        rules,
        watched,
        namespaces: 0,
        unreachable: Vec::new(),
    };
    for (ns, result) in runs {
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(err) => {
                listing.unreachable.push((ns, err.to_string()));
                continue;
            }
        };
        listing.namespaces += 1;
        let clock_len = size_of::<ClockRecord>();
        if bytes.len() < clock_len {
            continue;
        }
        let clock = iter::records::<ClockRecord>(&bytes[..clock_len], "list")?
            .next()
            .filter(|c| c.magic == ClockRecord::MAGIC)
            .ok_or(HostError::IterOutput {
                program: "list",
                len: bytes.len(),
            })?;
        let recs = iter::records::<ListRecord>(&bytes[clock_len..], "list")?;
        listing.connections.reserve(recs.len());
        listing.connections.extend(recs.map(|r| Connection {
            cookie: r.cookie,
            local: socket_addr(r.family, &r.local_addr, r.local_port),
            peer: socket_addr(r.family, &r.remote_addr, r.remote_port),
            slot: r.slot,
            idle_rx: Duration::from_nanos(u64::from(r.idle_rx_jiffies) * jiffy_ns),
            idle_tx: Duration::from_nanos(u64::from(r.idle_tx_jiffies) * jiffy_ns),
            probes_out: r.probes_out,
            state: r.state,
            inode: r.inode,
            picked_up: r.flags & sock_flags::PICKED_UP != 0,
            watched_for: Duration::from_nanos(clock.ktime_ns.saturating_sub(r.since_ns)),
            netns: ns.inode,
        }));
    }
    Ok(listing)
}

/// A process holding a watched socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Process id.
    pub pid: u32,
    /// The socket's file descriptor in it.
    pub fd: u32,
    /// Command name.
    pub comm: String,
}

/// The process holding each watched socket, by cookie, from the pinned owners iterator: the
/// kernel walks every process's files and writes a record for each watched socket, so this
/// costs no `readlink` per descriptor. Sockets no process holds (orphaned, closing) are
/// absent; a socket shared by several processes is named once.
pub fn owners(paths: &HostPaths) -> Result<HashMap<u64, Owner>, HostError> {
    let link = paths.owners_link();
    let file = std::fs::File::open(&link)
        .map_err(|e| HostError::syscall(format!("open {}", link.display()), e))?;
    let bytes = iter::read_all(file, "owners")?;
    let records = iter::records::<OwnerRecord>(&bytes, "owners")?;
    let mut out = HashMap::with_capacity(records.len());
    for r in records {
        out.entry(r.cookie).or_insert_with(|| {
            let len = r.comm.iter().position(|&b| b == 0).unwrap_or(r.comm.len());
            Owner {
                pid: r.pid,
                fd: r.fd,
                comm: String::from_utf8_lossy(&r.comm[..len]).into_owned(),
            }
        });
    }
    Ok(out)
}

/// The kernel's per-rule counters and rule names, read from the pins (for metrics and
/// `lull ls`, alongside a running host).
pub struct CountersReader {
    counters: PerCpuArray<MapData, RuleCounters>,
    names: Array<MapData, RuleName>,
}

impl CountersReader {
    /// Opens the pinned maps of instance `paths`.
    pub fn open(paths: &HostPaths) -> Result<Self, HostError> {
        if !paths.pins.exists() {
            return Err(HostError::NotInstalled {
                dir: paths.pins.clone(),
            });
        }
        Ok(Self {
            counters: open_map(&paths.map(HOST_COUNTERS_MAP), HOST_COUNTERS_MAP)?,
            names: open_map(&paths.map(HOST_NAMES_MAP), HOST_NAMES_MAP)?,
        })
    }

    /// The counters of every slot, summed over CPUs (index = slot).
    pub fn read(&self) -> Result<Vec<RuleCounters>, HostError> {
        (0..RULE_SLOTS as u32)
            .map(|slot| {
                let per_cpu = self
                    .counters
                    .get(&slot, 0)
                    .map_err(|source| HostError::Map {
                        name: HOST_COUNTERS_MAP,
                        source,
                    })?;
                let mut sum = RuleCounters::default();
                for c in per_cpu.iter() {
                    sum.add(c);
                }
                Ok(sum)
            })
            .collect()
    }

    /// Rule names by slot ("" for a free slot).
    pub fn names(&self) -> Result<Vec<String>, HostError> {
        (0..RULE_SLOTS as u32)
            .map(|slot| {
                self.names
                    .get(&slot, 0)
                    .map(|n| tables::name_of(&n).to_string())
                    .map_err(|source| HostError::Map {
                        name: HOST_NAMES_MAP,
                        source,
                    })
            })
            .collect()
    }
}

fn open_map<T>(path: &Path, name: &'static str) -> Result<T, HostError>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(path).map_err(|source| HostError::Map { name, source })?;
    let map = Map::from_map_data(data).map_err(|source| HostError::Map { name, source })?;
    T::try_from(map).map_err(|source| HostError::Map { name, source })
}
