//! Host-mode rules: which connections get which keepalive policy.
//!
//! ```toml
//! [[rule]]
//! name = "redis"
//! cgroup = "/sys/fs/cgroup/system.slice/redis.service"   # a cgroup v2 directory
//! local_ports = [6379]          # optional; also remote_ports, remote_cidrs
//! idle = "30s"
//! interval = "5s"
//! count = 3
//! user_timeout = "45s"          # optional
//! ```
//!
//! A rule matches a connection whose socket is in its cgroup or below it, and, when they are
//! given, whose local port, remote port and remote address are in its lists. The first
//! matching rule wins; a rule with `off = true` leaves what it matches alone. Ports are
//! numbers or `"LOW-HIGH"` ranges; CIDRs are IPv4 or IPv6 (`"10.0.0.0/8"`, `"fd00::/8"`,
//! or a bare address). A relative cgroup path is taken from the cgroup v2 root.
//!
//! Everything is checked when the file is read; a problem is reported with the file, line
//! and column, and nothing of the file is used.

use std::{
    net::IpAddr,
    ops::{Range, RangeInclusive},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use toml::Spanned;

use lull_common::host::{MAX_CIDRS, MAX_NAME, MAX_RULES};

use crate::activity::{cgroup2_root, check_cgroup_dir};

/// A rule file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file could not be read.
    #[error("reading {path}: {source}", path = path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Something in the file is wrong.
    #[error("{path}:{line}:{column}: {reason}", path = path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The rules of one configuration, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// Where they were read from (for messages).
    pub source: PathBuf,
    /// The rules; the first match wins.
    pub rules: Vec<Rule>,
}

/// One rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its name: in verdicts, metrics and `lull ls`.
    pub name: String,
    /// The cgroup v2 directory whose sockets (and its descendants') it covers.
    pub cgroup: PathBuf,
    /// Local ports; empty for any.
    pub local_ports: Vec<RangeInclusive<u16>>,
    /// Remote ports; empty for any.
    pub remote_ports: Vec<RangeInclusive<u16>>,
    /// Remote networks; empty for any.
    pub remote_cidrs: Vec<Cidr>,
    /// What it does to what it matches.
    pub action: Action,
    /// The line of its `[[rule]]` header (0 for rules not read from a file).
    pub line: usize,
}

/// What a rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Leave the connection alone, and stop looking at later rules.
    Off,
    /// Set these keepalive options and watch the connection.
    Keepalive(Keepalive),
}

/// Keepalive options, as the kernel takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// `TCP_KEEPIDLE`: silence before the first probe (whole seconds, 1 to 32,767).
    pub idle: Duration,
    /// `TCP_KEEPINTVL`: between probes (whole seconds, 1 to 32,767).
    pub interval: Duration,
    /// `TCP_KEEPCNT`: unanswered probes before the connection is dropped (1 to 127).
    pub count: u32,
    /// `TCP_USER_TIMEOUT`: how long sent data may stay unacknowledged (milliseconds); `None`
    /// leaves the socket's own setting.
    pub user_timeout: Option<Duration>,
}

/// An IPv4 or IPv6 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits are cleared).
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// The network as 16 bytes (IPv4 mapped into IPv6) and the prefix length over them.
    pub fn mapped(&self) -> ([u8; 16], u32) {
        match self.addr {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 96 + u32::from(self.prefix)),
            IpAddr::V6(v6) => (v6.octets(), u32::from(self.prefix)),
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    cgroup: Spanned<String>,
    local_ports: Option<Vec<Spanned<RawPort>>>,
    remote_ports: Option<Vec<Spanned<RawPort>>>,
    remote_cidrs: Option<Vec<Spanned<String>>>,
    idle: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    count: Option<Spanned<i64>>,
    user_timeout: Option<Spanned<String>>,
    off: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPort {
    One(i64),
    Range(String),
}

/// A problem at a byte span of the text, before it is turned into a line and column.
struct Bad(Range<usize>, String);

fn bad(span: Range<usize>, reason: impl Into<String>) -> Bad {
    Bad(span, reason.into())
}

impl Rules {
    /// Reads and checks the rule file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks rules from `text`; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, RulesError> {
        let at = |Bad(span, reason): Bad| {
            let (line, column) = line_column(text, span.start);
            RulesError::Invalid {
                path: path.into(),
                line,
                column,
                reason,
            }
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            at(Bad(
                e.span().unwrap_or(0..0),
                e.message().trim().replace('\n', " "),
            ))
        })?;
        let mut rules = Vec::with_capacity(raw.rule.len());
        for spanned in raw.rule {
            let line = line_column(text, spanned.span().start).0;
            let span = spanned.span();
            rules.push(rule(spanned.into_inner(), span, line).map_err(at)?);
        }
        check_set(&rules).map_err(|(i, reason)| RulesError::Invalid {
            path: path.into(),
            line: rules.get(i).map_or(1, |r| r.line),
            column: 1,
            reason,
        })?;
        Ok(Self {
            source: path.into(),
            rules,
        })
    }

    /// Checks rules made in code (for the library's users).
    pub fn new(rules: Vec<Rule>) -> Result<Self, RulesError> {
        let invalid = |i: usize, reason: String| RulesError::Invalid {
            path: "<rules>".into(),
            line: i + 1,
            column: 1,
            reason,
        };
        for (i, r) in rules.iter().enumerate() {
            check_name(&r.name).map_err(|e| invalid(i, e))?;
            check_cgroup_dir(&r.cgroup, false).map_err(|e| invalid(i, e.to_string()))?;
            for list in [&r.local_ports, &r.remote_ports] {
                check_ranges(list).map_err(|e| invalid(i, e))?;
            }
            if let Action::Keepalive(k) = r.action {
                check_keepalive(&k).map_err(|e| invalid(i, e))?;
            }
        }
        check_set(&rules).map_err(|(i, e)| invalid(i, e))?;
        Ok(Self {
            source: "<rules>".into(),
            rules,
        })
    }
}

fn rule(raw: RawRule, span: Range<usize>, line: usize) -> Result<Rule, Bad> {
    check_name(raw.name.get_ref()).map_err(|e| bad(raw.name.span(), e))?;
    let cgroup = resolve_cgroup(raw.cgroup.get_ref()).map_err(|e| bad(raw.cgroup.span(), e))?;
    let local_ports = ports(raw.local_ports.as_deref(), "local_ports", &span)?;
    let remote_ports = ports(raw.remote_ports.as_deref(), "remote_ports", &span)?;
    let mut remote_cidrs = Vec::new();
    if let Some(list) = &raw.remote_cidrs {
        if list.is_empty() {
            return Err(bad(
                span,
                "`remote_cidrs` is empty; leave it out to match any",
            ));
        }
        for c in list {
            remote_cidrs.push(parse_cidr(c.get_ref()).map_err(|e| bad(c.span(), e))?);
        }
    }
    let off = raw.off.as_ref().is_some_and(|o| *o.get_ref());
    let action = if off {
        for (key, given) in [
            ("idle", raw.idle.as_ref().map(Spanned::span)),
            ("interval", raw.interval.as_ref().map(Spanned::span)),
            ("count", raw.count.as_ref().map(Spanned::span)),
            ("user_timeout", raw.user_timeout.as_ref().map(Spanned::span)),
        ] {
            if let Some(s) = given {
                return Err(bad(
                    s,
                    format!("`{key}` has no meaning in a rule with `off = true`"),
                ));
            }
        }
        Action::Off
    } else {
        let need = |key: &str| {
            bad(
                span.clone(),
                format!(
                    "rule `{}` needs `{key}` (or `off = true`)",
                    raw.name.get_ref()
                ),
            )
        };
        let idle = raw.idle.as_ref().ok_or_else(|| need("idle"))?;
        let interval = raw.interval.as_ref().ok_or_else(|| need("interval"))?;
        let count = raw.count.as_ref().ok_or_else(|| need("count"))?;
        let keepalive = Keepalive {
            idle: seconds("idle", idle)?,
            interval: seconds("interval", interval)?,
            count: u32::try_from(*count.get_ref())
                .ok()
                .filter(|c| (1..=127).contains(c))
                .ok_or_else(|| {
                    bad(
                        count.span(),
                        format!("`count` must be 1 to 127, not {}", count.get_ref()),
                    )
                })?,
            user_timeout: raw
                .user_timeout
                .as_ref()
                .map(|u| {
                    let d = duration(u)?;
                    if d.as_millis() > i32::MAX as u128 || d.subsec_nanos() % 1_000_000 != 0 {
                        return Err(bad(
                            u.span(),
                            "`user_timeout` must be whole milliseconds up to 24 days",
                        ));
                    }
                    Ok(d)
                })
                .transpose()?,
        };
        Action::Keepalive(keepalive)
    };
    Ok(Rule {
        name: raw.name.into_inner(),
        cgroup,
        local_ports,
        remote_ports,
        remote_cidrs,
        action,
        line,
    })
}

fn check_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(ok_char) {
        return Err(format!(
            "rule name `{name}` must be 1 to {MAX_NAME} letters, digits, `_`, `-`, `.` or `:`"
        ));
    }
    Ok(())
}

fn resolve_cgroup(text: &str) -> Result<PathBuf, String> {
    let path = Path::new(text);
    let path = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cgroup2_root().map_err(|e| e.to_string())?.join(path)
    };
    check_cgroup_dir(&path, false).map_err(|e| e.to_string())?;
    Ok(path)
}

fn ports(
    list: Option<&[Spanned<RawPort>]>,
    key: &str,
    rule: &Range<usize>,
) -> Result<Vec<RangeInclusive<u16>>, Bad> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    if list.is_empty() {
        return Err(bad(
            rule.clone(),
            format!("`{key}` is empty; leave it out to match any"),
        ));
    }
    let mut out: Vec<(RangeInclusive<u16>, Range<usize>)> = Vec::new();
    for p in list {
        let range = parse_port(p.get_ref()).map_err(|e| bad(p.span(), format!("`{key}`: {e}")))?;
        if let Some((other, _)) = out
            .iter()
            .find(|(o, _)| o.start() <= range.end() && range.start() <= o.end())
        {
            return Err(bad(
                p.span(),
                format!(
                    "`{key}`: {} overlaps {}",
                    show_range(&range),
                    show_range(other)
                ),
            ));
        }
        out.push((range, p.span()));
    }
    Ok(out.into_iter().map(|(r, _)| r).collect())
}

fn show_range(r: &RangeInclusive<u16>) -> String {
    if r.start() == r.end() {
        r.start().to_string()
    } else {
        format!("{}-{}", r.start(), r.end())
    }
}

fn parse_port(raw: &RawPort) -> Result<RangeInclusive<u16>, String> {
    let one = |n: i64| {
        u16::try_from(n)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("port {n} is not 1 to 65535"))
    };
    match raw {
        RawPort::One(n) => one(*n).map(|p| p..=p),
        RawPort::Range(text) => {
            let parse = |s: &str| {
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| format!("`{text}` is not a port or a LOW-HIGH range"))
                    .and_then(one)
            };
            let (lo, hi) = match text.split_once('-') {
                Some((lo, hi)) => (parse(lo)?, parse(hi)?),
                None => {
                    let p = parse(text)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!("range `{text}` runs backwards"));
            }
            Ok(lo..=hi)
        }
    }
}

fn check_ranges(list: &[RangeInclusive<u16>]) -> Result<(), String> {
    for (i, a) in list.iter().enumerate() {
        if a.is_empty() || *a.start() == 0 {
            return Err(format!("bad port range {}", show_range(a)));
        }
        for b in &list[..i] {
            if a.start() <= b.end() && b.start() <= a.end() {
                return Err(format!("{} overlaps {}", show_range(a), show_range(b)));
            }
        }
    }
    Ok(())
}

/// Parses `10.0.0.0/8`, `fd00::/8` or a bare address (a host).
pub fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not an IP address or CIDR"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|&p| p <= max)
            .ok_or_else(|| format!("`{text}`: the prefix length must be 0 to {max}"))?,
    };
    let addr = match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    };
    Ok(Cidr { addr, prefix })
}

fn duration(value: &Spanned<String>) -> Result<Duration, Bad> {
    humantime::parse_duration(value.get_ref().trim()).map_err(|e| {
        bad(
            value.span(),
            format!(
                "`{}` is not a duration ({e}); use e.g. 30s, 5m, 250ms",
                value.get_ref()
            ),
        )
    })
}

fn seconds(key: &str, value: &Spanned<String>) -> Result<Duration, Bad> {
    let d = duration(value)?;
    if d.subsec_nanos() != 0 || !(1..=32_767).contains(&d.as_secs()) {
        return Err(bad(
            value.span(),
            format!(
                "`{key}` must be whole seconds from 1s to 32767s (the kernel counts it in \
                 seconds), not `{}`",
                value.get_ref()
            ),
        ));
    }
    Ok(d)
}

fn check_keepalive(k: &Keepalive) -> Result<(), String> {
    for (key, d) in [("idle", k.idle), ("interval", k.interval)] {
        if d.subsec_nanos() != 0 || !(1..=32_767).contains(&d.as_secs()) {
            return Err(format!("`{key}` must be whole seconds from 1s to 32767s"));
        }
    }
    if !(1..=127).contains(&k.count) {
        return Err("`count` must be 1 to 127".into());
    }
    if k.user_timeout
        .is_some_and(|u| u.as_millis() > i32::MAX as u128 || u.subsec_nanos() % 1_000_000 != 0)
    {
        return Err("`user_timeout` must be whole milliseconds up to 24 days".into());
    }
    Ok(())
}

/// Checks what concerns the rules together; returns the index of the rule at fault.
fn check_set(rules: &[Rule]) -> Result<(), (usize, String)> {
    if rules.len() > MAX_RULES {
        return Err((
            MAX_RULES,
            format!("{} rules; at most {MAX_RULES} are allowed", rules.len()),
        ));
    }
    let mut cidrs = 0;
    for (i, r) in rules.iter().enumerate() {
        if let Some(first) = rules[..i].iter().position(|o| o.name == r.name) {
            return Err((
                i,
                format!(
                    "rule name `{}` is used twice (first at line {})",
                    r.name, rules[first].line
                ),
            ));
        }
        cidrs += r.remote_cidrs.len();
        if cidrs > MAX_CIDRS / 2 {
            return Err((i, format!("more than {} CIDRs in all", MAX_CIDRS / 2)));
        }
    }
    Ok(())
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
