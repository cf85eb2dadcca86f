//! `lull ls`: the watched connections of a running host, read from the kernel.
//!
//! The rows come from the pinned list iterator (`<pins>/list`), opened like a file once per
//! network namespace: the kernel walks its TCP tables and writes a fixed-size binary record
//! for each watched socket, so a million rows cost a few thousand `read` calls, and no
//! per-row system call. Idle times come from the kernel's own jiffies stamps, which cost
//! nothing per packet.

use std::{collections::HashMap, net::SocketAddr, path::Path, sync::mpsc, time::Duration};

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

/// What `lull ls` knows besides the rows.
#[derive(Clone, Debug)]
pub struct ListSummary {
    /// Rule names, by slot.
    pub rules: Vec<String>,
    /// Connections the kernel counts as watched (applied or picked up, minus closed). More
    /// than the rows listed means some could not be listed (see `unreachable`).
    pub watched: u64,
    /// Network namespaces listed.
    pub namespaces: usize,
    /// Network namespaces that could not be entered, and why.
    pub unreachable: Vec<(Netns, String)>,
}

impl ListSummary {
    /// The name of the rule in `slot`.
    pub fn rule(&self, slot: u16) -> &str {
        self.rules
            .get(usize::from(slot))
            .map_or("?", String::as_str)
    }
}

/// Every watched connection, collected.
#[derive(Clone, Debug)]
pub struct Listing {
    /// The watched connections.
    pub connections: Vec<Connection>,
    /// The rest.
    pub summary: ListSummary,
}

/// Lists the watched connections of instance `paths` into a [`Listing`]. Fails with
/// [`HostError::NotRunning`] when no `lull host` runs it.
pub fn list(paths: &HostPaths) -> Result<Listing, HostError> {
    let mut connections = Vec::new();
    let summary = list_each(paths, |c, _| connections.push(*c))?;
    Ok(Listing {
        connections,
        summary,
    })
}

/// Calls `f` with each watched connection of instance `paths` and its rule's name, as the
/// kernel's iterators produce them: every network namespace is read on a thread of its own,
/// in chunks, while `f` runs, so a caller that formats rows overlaps the kernel's walk of its
/// TCP tables.
pub fn list_each(
    paths: &HostPaths,
    mut f: impl FnMut(&Connection, &str),
) -> Result<ListSummary, HostError> {
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
    let mut summary = ListSummary {
        rules: counters.names()?,
        watched: counters.read()?.iter().map(RuleCounters::watched).sum(),
        namespaces: 0,
        unreachable: Vec::new(),
    };
    let jiffy_ns = 1_000_000_000 / u64::from(hz);
    let namespaces = netns::all();
    let own = namespaces.first().map(|n| n.inode);
    std::thread::scope(|scope| {
        // Bounded: a slow consumer holds the readers back (at most 64 chunks in memory).
        let (tx, rx) = mpsc::sync_channel::<(usize, Result<Vec<u8>, HostError>)>(64);
        for (i, ns) in namespaces.iter().enumerate() {
            let (tx, link) = (tx.clone(), &link);
            scope.spawn(move || {
                let result = (|| {
                    if Some(ns.inode) != own {
                        netns::enter(ns)?;
                    }
                    let file = std::fs::File::open(link)
                        .map_err(|e| HostError::syscall(format!("open {}", link.display()), e))?;
                    iter::read_chunks(
                        file,
                        "list",
                        size_of::<ListRecord>(),
                        size_of::<ClockRecord>(),
                        |chunk| tx.send((i, Ok(chunk))).is_ok(),
                    )
                })();
                if let Err(err) = result {
                    let _ = tx.send((i, Err(err)));
                }
            });
        }
        drop(tx);
        let mut clocks: Vec<Option<ClockRecord>> = vec![None; namespaces.len()];
        let mut failed = vec![false; namespaces.len()];
        for (i, chunk) in rx {
            let mut bytes = match chunk {
                Ok(bytes) => bytes,
                Err(err) => {
                    failed[i] = true;
                    summary
                        .unreachable
                        .push((namespaces[i].clone(), err.to_string()));
                    continue;
                }
            };
            let mut at = 0;
            if clocks[i].is_none() {
                let clock = iter::records::<ClockRecord>(
                    &bytes[..size_of::<ClockRecord>().min(bytes.len())],
                    "list",
                )
                .ok()
                .and_then(|mut c| c.next())
                .filter(|c| c.magic == ClockRecord::MAGIC);
                if clock.is_none() {
                    failed[i] = true;
                    summary.unreachable.push((
                        namespaces[i].clone(),
                        "the list iterator wrote no clock record".into(),
                    ));
                    continue;
                }
                clocks[i] = clock;
                at = size_of::<ClockRecord>();
            }
            let Some(clock) = clocks[i] else { continue };
            let netns = namespaces[i].inode;
            let Ok(records) = iter::records::<ListRecord>(&bytes[at..], "list") else {
                continue;
            };
            for r in records {
                let rule = summary
                    .rules
                    .get(usize::from(r.slot))
                    .map_or("?", String::as_str);
                let c = Connection {
                    cookie: r.cookie,
                    local: socket_addr(r.family, &r.local_addr, r.local_port),
                    peer: socket_addr(r.family, &r.remote_addr, r.remote_port),
                    slot: r.slot,
                    idle_rx: Duration::from_nanos(u64::from(r.idle_rx_jiffies) * jiffy_ns),
                    idle_tx: Duration::from_nanos(u64::from(r.idle_tx_jiffies) * jiffy_ns),
                    probes_out: r.probes_out,
                    state: r.state,
                    picked_up: r.flags & sock_flags::PICKED_UP != 0,
                    watched_for: Duration::from_nanos(clock.ktime_ns.saturating_sub(r.since_ns)),
                    netns,
                };
                f(&c, rule);
            }
            bytes.clear();
        }
        summary.namespaces = failed.iter().filter(|f| !**f).count();
    });
    Ok(summary)
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
        sum_counters(&self.counters)
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

/// The counters of every slot of `counters`, summed over CPUs (index = slot).
pub(crate) fn sum_counters(
    counters: &PerCpuArray<MapData, RuleCounters>,
) -> Result<Vec<RuleCounters>, HostError> {
    (0..RULE_SLOTS as u32)
        .map(|slot| {
            let per_cpu = counters.get(&slot, 0).map_err(|source| HostError::Map {
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
