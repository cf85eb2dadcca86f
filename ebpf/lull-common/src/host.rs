//! Host mode: the types `lull host`'s kernel programs and its userspace agree on.
//!
//! Host mode applies keepalive policy to sockets of processes lull does not own. A `sock_ops`
//! program, attached to the cgroups the rules name, matches each connection once, when it is
//! established, against the rules in [`HOST_BANKS_MAP`] and friends; sets the rule's keepalive
//! options with `bpf_setsockopt`; and asks for state callbacks on that socket only. When the
//! socket closes it classifies the close into a [`verdict`] and sends a [`VerdictEvent`] to
//! userspace through a ring buffer. Iterators over TCP sockets pick up connections that existed
//! before (`PICKUP_PROG`) and list the watched ones for `lull ls` (`LIST_PROG`).
//!
//! Every map here is pinned, so policy and state outlive the `lull host` process.

/// Most rules one configuration may hold; a `u64` mask has one bit per rule position.
pub const MAX_RULES: usize = 64;
/// Stable rule identities (slots). A rule keeps its slot across reloads as long as its name
/// stays, so a connection's rule stays known after the order of rules changes.
pub const RULE_SLOTS: usize = 256;
/// Longest rule name, in bytes.
pub const MAX_NAME: usize = 48;
/// How many cgroup levels above a socket's own cgroup the programs look for a rule's cgroup.
pub const MAX_CGROUP_DEPTH: usize = 16;
/// `u64` words of one port bitmap (65,536 ports).
pub const PORT_WORDS: usize = 1024;
/// Entries of [`HOST_PORTS_MAP`]: two banks, each rule position, local and remote.
pub const PORT_MAP_ENTRIES: usize = 2 * MAX_RULES * 2 * PORT_WORDS;
/// Entries of [`HOST_CIDRS_MAP`].
pub const MAX_CIDRS: usize = 8192;
/// Entries of [`HOST_CGROUPS_MAP`]: (bank, cgroup) pairs.
pub const MAX_RULE_CGROUPS: usize = 2 * MAX_RULES;
/// Bytes of the verdict ring buffer: about 80,000 [`VerdictEvent`]s (96 bytes plus the ring's
/// 8-byte header each) can wait there while nobody reads, for example while lull restarts.
/// The reader maps the ring twice over (the kernel's trick to read across the wrap), so this
/// costs `lull host` twice as much resident memory, though the pages are the kernel's.
pub const VERDICT_RING_BYTES: usize = 8 << 20;

/// `Array<HostConfig, 1>`: which bank is in force, and facts for `lull ls`.
pub const HOST_CONFIG_MAP: &str = "HOST_CONFIG";
/// `Array<RuleBank, 2>`: two copies of the rules; userspace fills the one not in force, then
/// flips [`HostConfig::active_bank`], so a reload is atomic for every new connection.
pub const HOST_BANKS_MAP: &str = "HOST_BANKS";
/// `Array<u64, PORT_MAP_ENTRIES>`, `BPF_F_MMAPABLE`: port bitmaps, see [`port_word_index`].
pub const HOST_PORTS_MAP: &str = "HOST_PORTS";
/// `LpmTrie<CidrKey, u8>`: the remote CIDRs of each rule, see [`CidrKey`].
pub const HOST_CIDRS_MAP: &str = "HOST_CIDRS";
/// `HashMap<CgroupKey, u64>`: for a bank and a cgroup id, the mask of rule positions that
/// name that cgroup.
pub const HOST_CGROUPS_MAP: &str = "HOST_CGROUPS";
/// `SkStorage<SockRecord>`: present on every socket a rule watches.
pub const HOST_SOCKS_MAP: &str = "HOST_SOCKS";
/// `RingBuf`: [`VerdictEvent`]s.
pub const HOST_VERDICTS_MAP: &str = "HOST_VERDICTS";
/// `PerCpuArray<RuleCounters, RULE_SLOTS>`: per rule slot, counted in the kernel.
pub const HOST_COUNTERS_MAP: &str = "HOST_COUNTERS";
/// `Array<RuleName, RULE_SLOTS>`: each slot's rule name, for `lull ls` and restarts.
pub const HOST_NAMES_MAP: &str = "HOST_NAMES";

/// The `sock_ops` program.
pub const SOCK_OPS_PROG: &str = "lull_host_sock_ops";
/// The `iter/tcp` program that applies rules to connections that already exist.
pub const PICKUP_PROG: &str = "lull_host_pickup";
/// The `iter/tcp` program that lists watched connections.
pub const LIST_PROG: &str = "lull_host_list";
/// The `iter/task_file` program that finds the process holding each watched socket.
pub const OWNERS_PROG: &str = "lull_host_owners";
/// The `iter/bpf_map` program that reads the kernel's jiffies and monotonic clock together.
pub const CLOCK_PROG: &str = "lull_host_clock";

/// What a close is classified as. The numbers are the wire format of [`VerdictEvent`].
pub mod verdict {
    /// The kernel's keepalive probes went unanswered (`sk_err` ETIMEDOUT, probes out, nothing
    /// retransmitted).
    pub const KEEPALIVE_TIMEOUT: u8 = 1;
    /// Data (or a FIN) stayed unacknowledged until the retransmission limit or
    /// `TCP_USER_TIMEOUT` (`sk_err` ETIMEDOUT or a soft ICMP error, with retransmissions).
    pub const USER_TIMEOUT: u8 = 2;
    /// The peer sent a RST (`sk_err` ECONNRESET, or EPIPE in CLOSE_WAIT).
    pub const RESET_BY_PEER: u8 = 3;
    /// An orderly close: FINs both ways (`sk_err` 0, from a FIN_WAIT, CLOSING or LAST_ACK).
    pub const CLOSED: u8 = 4;
    /// This side aborted: a RST sent by the application (`SO_LINGER` 0, unread data at close)
    /// or by `ss -K` (`sk_err` 0 or ECONNABORTED, from ESTABLISHED or CLOSE_WAIT).
    pub const LOCAL_ABORT: u8 = 5;
    /// Number of verdicts plus one (index 0 is unused).
    pub const COUNT: usize = 6;
}

/// Flags of [`RuleSpec::flags`].
pub mod rule_flags {
    /// The rule leaves matching sockets alone (and stops the search).
    pub const OFF: u32 = 1 << 0;
    /// The rule lists local ports.
    pub const LOCAL_PORTS: u32 = 1 << 1;
    /// The rule lists remote ports.
    pub const REMOTE_PORTS: u32 = 1 << 2;
    /// The rule lists remote CIDRs.
    pub const REMOTE_CIDRS: u32 = 1 << 3;
    /// The rule sets `TCP_USER_TIMEOUT`.
    pub const USER_TIMEOUT: u32 = 1 << 4;
}

/// Flags of [`SockRecord::flags`] and [`VerdictEvent::flags`].
pub mod sock_flags {
    /// Picked up by the iterator (it existed before lull applied the rule): the age counts
    /// from then, not from the connection's establishment.
    pub const PICKED_UP: u16 = 1 << 0;
}

/// Outcomes of the pickup iterator, in [`PickupRecord::result`].
pub mod pickup {
    /// Options set, state callbacks on, watched from now on.
    pub const PICKED: u8 = 0;
    /// The socket matched a rule but is not ESTABLISHED (it is closing, or not yet open).
    pub const NOT_ESTABLISHED: u8 = 1;
    /// `bpf_setsockopt` refused an option; `err` holds its error.
    pub const SETSOCKOPT: u8 = 2;
    /// State callbacks could not be turned on (`TCP_BPF_SOCK_OPS_CB_FLAGS`, Linux 6.14+).
    pub const CB_FLAGS: u8 = 3;
    /// The socket storage could not be created (memory).
    pub const STORAGE: u8 = 4;
    /// The socket's cgroup could not be read, so no rule could be told to match.
    pub const NO_CGROUP: u8 = 5;
}

/// Index of one of [`HOST_PORTS_MAP`]'s words: bank, rule position, direction (0 local,
/// 1 remote) and the port's word.
#[inline(always)]
pub const fn port_word_index(bank: u32, position: u32, remote: bool, port: u16) -> u32 {
    (((bank & 1) * MAX_RULES as u32 + position) * 2 + remote as u32) * PORT_WORDS as u32
        + (port as u32 >> 6)
}

/// [`HOST_CONFIG_MAP`]'s one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// The bank new connections are matched against (0 or 1).
    pub active_bank: u32,
    /// The kernel's `HZ`, measured by `lull host` at start, for turning jiffies into seconds.
    pub hz: u32,
    /// Verdicts lost (ring full) that `lull host` has already reported.
    pub lost_reported: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the running configuration was written.
    pub written_ns: u64,
}

/// One rule as the kernel sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleSpec {
    /// The rule's slot: its identity in [`HOST_NAMES_MAP`] and [`HOST_COUNTERS_MAP`].
    pub slot: u32,
    /// [`rule_flags`].
    pub flags: u32,
    /// `TCP_KEEPIDLE`, seconds.
    pub idle_s: u32,
    /// `TCP_KEEPINTVL`, seconds.
    pub interval_s: u32,
    /// `TCP_KEEPCNT`.
    pub count: u32,
    /// `TCP_USER_TIMEOUT`, milliseconds (when [`rule_flags::USER_TIMEOUT`] is set).
    pub user_timeout_ms: u32,
}

/// [`HOST_BANKS_MAP`]'s value: the rules in order (the first match wins).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleBank {
    /// How many of `rules` are in use.
    pub count: u32,
    /// Padding; always 0.
    pub _pad: u32,
    /// The rules, first match first.
    pub rules: [RuleSpec; MAX_RULES],
}

impl Default for RuleBank {
    fn default() -> Self {
        Self {
            count: 0,
            _pad: 0,
            rules: [RuleSpec::default(); MAX_RULES],
        }
    }
}

/// [`HOST_CGROUPS_MAP`]'s key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    /// The cgroup's id (its directory's inode number in cgroup2fs).
    pub cgroup_id: u64,
    /// The bank.
    pub bank: u32,
    /// Padding; always 0.
    pub _pad: u32,
}

/// [`HOST_CIDRS_MAP`]'s key data, after the trie's `u32` prefix length.
///
/// The prefix covers the bank and rule position (16 bits), then the address. IPv4 addresses
/// are stored IPv4-mapped (`::ffff:a.b.c.d`), so a v4 CIDR also matches IPv4 peers of IPv6
/// sockets, and one lookup serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrKey {
    /// The bank.
    pub bank: u8,
    /// The rule position in the bank.
    pub position: u8,
    /// The address, network byte order, IPv4 mapped into IPv6.
    pub addr: [u8; 16],
}

/// [`HOST_SOCKS_MAP`]'s value: what the kernel keeps on a watched socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRecord {
    /// The socket cookie (`bpf_get_socket_cookie`; `ss -e` shows it in hex, as `sk:`).
    pub cookie: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the rule was applied.
    pub since_ns: u64,
    /// The rule's slot.
    pub slot: u16,
    /// [`sock_flags`].
    pub flags: u16,
    /// For a connection the pickup iterator picked up: the low 32 bits of that iterator
    /// run's session id (0 otherwise). When a record does not fit the iterator's buffer the
    /// kernel runs the program again for the same socket; this tells the second run that the
    /// first one picked it up, so it writes the record again instead of skipping it.
    pub session: u32,
}

/// A watched connection ended: one record of [`HOST_VERDICTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    /// The socket cookie.
    pub cookie: u64,
    /// `CLOCK_MONOTONIC` nanoseconds when the rule was applied ([`SockRecord::since_ns`]).
    pub since_ns: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the close.
    pub closed_ns: u64,
    /// Bytes received over the connection's life (`tcp_sock.bytes_received`).
    pub bytes_received: u64,
    /// Bytes sent and acknowledged (`tcp_sock.bytes_acked`).
    pub bytes_acked: u64,
    /// `sk_err` at the close.
    pub sk_err: i32,
    /// The rule's slot.
    pub slot: u16,
    /// [`sock_flags`].
    pub flags: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Local port, host byte order.
    pub local_port: u16,
    /// Remote port, host byte order.
    pub remote_port: u16,
    /// A [`verdict`].
    pub verdict: u8,
    /// The TCP state the socket left for TCP_CLOSE.
    pub old_state: u8,
    /// `icsk_probes_out` at the close: keepalive (or zero-window) probes unanswered.
    pub probes_out: u8,
    /// `icsk_retransmits` at the close.
    pub retransmits: u8,
    /// Padding; always 0.
    pub _pad: [u8; 6],
    /// Local address, network byte order; IPv4 in the first 4 bytes.
    pub local_addr: [u8; 16],
    /// Remote address, as `local_addr`.
    pub remote_addr: [u8; 16],
}

/// Per rule slot, per CPU: what the kernel counted. Userspace sums the CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Connections the rule was applied to at establishment.
    pub applied: u64,
    /// Connections the rule was applied to by the pickup iterator.
    pub picked_up: u64,
    /// Connections that matched the rule but kept some option unset (`bpf_setsockopt` failed).
    pub setsockopt_failed: u64,
    /// Closes, by [`verdict`] (index 0 unused).
    pub closed: [u64; verdict::COUNT],
    /// Verdicts that found the ring buffer full and were lost.
    pub lost: u64,
}

impl RuleCounters {
    /// Connections watched now: applied or picked up, minus closed.
    pub fn watched(&self) -> u64 {
        let closed: u64 = self.closed.iter().sum();
        (self.applied + self.picked_up).saturating_sub(closed)
    }

    /// Adds `other` (another CPU's counts) into `self`.
    pub fn add(&mut self, other: &Self) {
        self.applied += other.applied;
        self.picked_up += other.picked_up;
        self.setsockopt_failed += other.setsockopt_failed;
        for (a, b) in self.closed.iter_mut().zip(other.closed.iter()) {
            *a += b;
        }
        self.lost += other.lost;
    }
}

/// [`HOST_NAMES_MAP`]'s value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleName {
    /// Length of `name`; 0 for a free slot.
    pub len: u32,
    /// Padding; always 0.
    pub _pad: u32,
    /// The cgroup id the rule named when last written.
    pub cgroup_id: u64,
    /// UTF-8 bytes of the name.
    pub name: [u8; MAX_NAME],
}

impl Default for RuleName {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            cgroup_id: 0,
            name: [0; MAX_NAME],
        }
    }
}

/// The first record the list iterator writes: the clocks, read together.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockRecord {
    /// Always [`ClockRecord::MAGIC`].
    pub magic: u64,
    /// `bpf_jiffies64()`.
    pub jiffies: u64,
    /// `bpf_ktime_get_ns()`.
    pub ktime_ns: u64,
}

impl ClockRecord {
    /// Marks a clock record ("lullclk\0").
    pub const MAGIC: u64 = u64::from_le_bytes(*b"lullclk\0");
}

/// One watched connection, as the list iterator writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListRecord {
    /// The socket cookie.
    pub cookie: u64,
    /// [`SockRecord::since_ns`].
    pub since_ns: u64,
    /// Jiffies since the last segment was received (the smaller of `icsk_ack.lrcvtime` and
    /// `rcv_tstamp` ages, as the keepalive timer counts).
    pub idle_rx_jiffies: u32,
    /// Jiffies since data was last sent (`lsndtime`).
    pub idle_tx_jiffies: u32,
    /// The rule's slot.
    pub slot: u16,
    /// [`sock_flags`].
    pub flags: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Local port, host byte order.
    pub local_port: u16,
    /// Remote port, host byte order.
    pub remote_port: u16,
    /// TCP state (`TCP_ESTABLISHED` is 1).
    pub state: u8,
    /// `icsk_probes_out`: keepalive probes sent and not answered yet.
    pub probes_out: u8,
    /// Padding; always 0.
    pub _pad: [u8; 4],
    /// Local address, network byte order; IPv4 in the first 4 bytes.
    pub local_addr: [u8; 16],
    /// Remote address, as `local_addr`.
    pub remote_addr: [u8; 16],
}

/// A process holding a watched socket, as the owners iterator writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerRecord {
    /// The socket's cookie.
    pub cookie: u64,
    /// The process (thread group) id.
    pub pid: u32,
    /// The file descriptor number in that process.
    pub fd: u32,
    /// The command name (`task_struct.comm`), NUL-padded.
    pub comm: [u8; 16],
}

/// One socket the pickup iterator looked at that a rule matched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PickupRecord {
    /// The socket cookie.
    pub cookie: u64,
    /// A [`pickup`] outcome.
    pub result: u8,
    /// TCP state.
    pub state: u8,
    /// The matching rule's slot (0xffff when none could be told).
    pub slot: u16,
    /// The error of the failed call, for [`pickup::SETSOCKOPT`] and [`pickup::CB_FLAGS`].
    pub err: i32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: (this impl and every one below) #[repr(C)] structs of plain integers and byte
    // arrays, with explicit padding fields, so every bit pattern is valid and they can be
    // copied to and from the kernel byte for byte.
    unsafe impl aya::Pod for HostConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RuleSpec {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RuleBank {}
    // SAFETY: see above.
    unsafe impl aya::Pod for CgroupKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for CidrKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for SockRecord {}
    // SAFETY: see above.
    unsafe impl aya::Pod for VerdictEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RuleCounters {}
    // SAFETY: see above.
    unsafe impl aya::Pod for RuleName {}
    // SAFETY: see above.
    unsafe impl aya::Pod for ClockRecord {}
    // SAFETY: see above.
    unsafe impl aya::Pod for ListRecord {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PickupRecord {}
    // SAFETY: see above.
    unsafe impl aya::Pod for OwnerRecord {}
}

// The layouts are the interface: pin their sizes so a change is deliberate.
const _: () = assert!(core::mem::size_of::<HostConfig>() == 24);
const _: () = assert!(core::mem::size_of::<RuleSpec>() == 24);
const _: () = assert!(core::mem::size_of::<RuleBank>() == 8 + 24 * MAX_RULES);
const _: () = assert!(core::mem::size_of::<CgroupKey>() == 16);
const _: () = assert!(core::mem::size_of::<CidrKey>() == 18);
const _: () = assert!(core::mem::size_of::<SockRecord>() == 24);
const _: () = assert!(core::mem::size_of::<VerdictEvent>() == 96);
const _: () = assert!(core::mem::size_of::<RuleCounters>() == 8 * (4 + verdict::COUNT));
const _: () = assert!(core::mem::size_of::<RuleName>() == 16 + MAX_NAME);
const _: () = assert!(core::mem::size_of::<ClockRecord>() == 24);
const _: () = assert!(core::mem::size_of::<ListRecord>() == 72);
const _: () = assert!(core::mem::size_of::<PickupRecord>() == 16);
const _: () = assert!(core::mem::size_of::<OwnerRecord>() == 32);
