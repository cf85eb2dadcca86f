//! Writing rules into the kernel's tables.
//!
//! There are two banks of every table. A new configuration is written into the bank not in
//! force, then `HostConfig::active_bank` is flipped with one map update: a connection being
//! established sees the old rules or the new ones, never a mix. Nothing else changes, so a
//! reload drops no state: watched sockets keep their records and their rule's slot.
//!
//! Rules are known to the kernel by slot, a stable identity kept by name in `HOST_NAMES`, so
//! `lull ls` and verdicts name a connection's rule correctly after the rules are reordered
//! or the rule is removed.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use aya::maps::lpm_trie::Key;
use lull_common::host::{
    CgroupKey, CidrKey, HostConfig, MAX_NAME, MAX_RULES, PORT_WORDS, RULE_SLOTS, RuleBank,
    RuleName, RuleSpec, port_word_index, rule_flags,
};

use super::{
    HostError,
    kernel::Kernel,
    rules::{Action, Rules},
};

/// The rules' slots, by name, as the kernel's `HOST_NAMES` holds them.
pub(crate) fn read_names(kernel: &Kernel) -> Result<Vec<RuleName>, HostError> {
    (0..RULE_SLOTS as u32)
        .map(|i| {
            kernel.names.get(&i, 0).map_err(|source| HostError::Map {
                name: "HOST_NAMES",
                source,
            })
        })
        .collect()
}

/// The name in a [`RuleName`].
pub(crate) fn name_of(entry: &RuleName) -> &str {
    let len = (entry.len as usize).min(MAX_NAME);
    std::str::from_utf8(&entry.name[..len]).unwrap_or("?")
}

/// Gives each rule a slot: its old one if its name had one, else a free one, else one whose
/// rule is gone and that watches nothing any more (`watched(slot) == 0`).
fn assign_slots(
    names: &[RuleName],
    rules: &Rules,
    watched: impl Fn(u32) -> u64,
) -> Result<Vec<u32>, HostError> {
    let mut taken = vec![false; RULE_SLOTS];
    let mut slots = vec![None; rules.rules.len()];
    for (i, rule) in rules.rules.iter().enumerate() {
        if let Some(s) = names
            .iter()
            .position(|n| n.len > 0 && name_of(n) == rule.name)
        {
            slots[i] = Some(s as u32);
            taken[s] = true;
        }
    }
    for slot in &mut slots {
        if slot.is_some() {
            continue;
        }
        let free = (0..RULE_SLOTS).find(|&s| !taken[s] && names[s].len == 0);
        let reclaim =
            || (0..RULE_SLOTS).find(|&s| !taken[s] && names[s].len > 0 && watched(s as u32) == 0);
        let s = free.or_else(reclaim).ok_or_else(|| {
            HostError::syscall(
                "assigning rule slots",
                std::io::Error::other(format!(
                    "all {RULE_SLOTS} rule slots hold rules that still watch connections"
                )),
            )
        })?;
        taken[s] = true;
        *slot = Some(s as u32);
    }
    Ok(slots
        .into_iter()
        .map(|s| s.expect("every rule got a slot"))
        .collect())
}

/// Writes `rules` (with `cgroup_ids[i]` the id of rule i's cgroup) into the bank not in
/// force, then puts it in force. Returns the slots given to the rules.
pub(crate) fn apply(
    kernel: &mut Kernel,
    rules: &Rules,
    cgroup_ids: &[u64],
    hz: u32,
) -> Result<Vec<u32>, HostError> {
    let names = read_names(kernel)?;
    let counters = super::read_counters(kernel)?;
    let slots = assign_slots(&names, rules, |s| counters[s as usize].watched())?;
    let config = kernel
        .config
        .get(&0, 0)
        .map_err(|source| map_error("HOST_CONFIG", source))?;
    let bank = 1 - (config.active_bank & 1);

    let mut table = RuleBank {
        count: rules.rules.len() as u32,
        ..RuleBank::default()
    };
    let mut masks: BTreeMap<u64, u64> = BTreeMap::new();
    for (position, rule) in rules.rules.iter().enumerate() {
        let mut spec = RuleSpec {
            slot: slots[position],
            ..RuleSpec::default()
        };
        match rule.action {
            Action::Off => spec.flags |= rule_flags::OFF,
            Action::Keepalive(k) => {
                spec.idle_s = k.idle.as_secs() as u32;
                spec.interval_s = k.interval.as_secs() as u32;
                spec.count = k.count;
                if let Some(u) = k.user_timeout {
                    spec.flags |= rule_flags::USER_TIMEOUT;
                    spec.user_timeout_ms = u.as_millis() as u32;
                }
            }
        }
        if !rule.local_ports.is_empty() {
            spec.flags |= rule_flags::LOCAL_PORTS;
        }
        if !rule.remote_ports.is_empty() {
            spec.flags |= rule_flags::REMOTE_PORTS;
        }
        if !rule.remote_cidrs.is_empty() {
            spec.flags |= rule_flags::REMOTE_CIDRS;
        }
        table.rules[position] = spec;
        *masks.entry(cgroup_ids[position]).or_default() |= 1 << position;
    }

    // Port bitmaps: clear the bank's, then set each rule's.
    let ports = kernel.ports()?;
    for position in 0..MAX_RULES as u32 {
        for remote in [false, true] {
            let first = port_word_index(bank, position, remote, 0);
            for w in first..first + PORT_WORDS as u32 {
                ports.word(w).store(0, Ordering::Relaxed);
            }
        }
    }
    for (position, rule) in rules.rules.iter().enumerate() {
        for (remote, list) in [(false, &rule.local_ports), (true, &rule.remote_ports)] {
            for range in list {
                for port in range.clone() {
                    let word = port_word_index(bank, position as u32, remote, port);
                    ports
                        .word(word)
                        .fetch_or(1 << (port & 63), Ordering::Relaxed);
                }
            }
        }
    }

    drop(ports);

    // CIDRs and cgroup masks: remove the bank's old entries, add the new ones.
    let old_cidrs: Vec<Key<CidrKey>> = kernel
        .cidrs
        .keys()
        .filter_map(Result::ok)
        .filter(|k| u32::from(k.data().bank) == bank)
        .collect();
    for key in old_cidrs {
        let _ = kernel.cidrs.remove(&key);
    }
    for (position, rule) in rules.rules.iter().enumerate() {
        for cidr in &rule.remote_cidrs {
            let (addr, prefix) = cidr.mapped();
            let key = Key::new(
                16 + prefix,
                CidrKey {
                    bank: bank as u8,
                    position: position as u8,
                    addr,
                },
            );
            kernel
                .cidrs
                .insert(&key, 1, 0)
                .map_err(|source| map_error("HOST_CIDRS", source))?;
        }
    }
    let old_cgroups: Vec<CgroupKey> = kernel
        .cgroups
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.bank == bank)
        .collect();
    for key in old_cgroups {
        let _ = kernel.cgroups.remove(&key);
    }
    for (&cgroup_id, &mask) in &masks {
        let key = CgroupKey {
            cgroup_id,
            bank,
            _pad: 0,
        };
        kernel
            .cgroups
            .insert(key, mask, 0)
            .map_err(|source| map_error("HOST_CGROUPS", source))?;
    }

    kernel
        .banks
        .set(bank, table, 0)
        .map_err(|source| map_error("HOST_BANKS", source))?;
    for (position, rule) in rules.rules.iter().enumerate() {
        let mut entry = RuleName {
            len: rule.name.len() as u32,
            cgroup_id: cgroup_ids[position],
            ..RuleName::default()
        };
        entry.name[..rule.name.len()].copy_from_slice(rule.name.as_bytes());
        kernel
            .names
            .set(slots[position], entry, 0)
            .map_err(|source| map_error("HOST_NAMES", source))?;
    }
    // The flip: from here new connections use the new bank.
    let config = HostConfig {
        active_bank: bank,
        hz,
        written_ns: crate::clock::monotonic_ns(),
        ..config
    };
    kernel
        .config
        .set(0, config, 0)
        .map_err(|source| map_error("HOST_CONFIG", source))?;
    Ok(slots)
}

fn map_error(name: &'static str, source: aya::maps::MapError) -> HostError {
    HostError::Map { name, source }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::host::rules::Rule;

    fn named(name: &str) -> RuleName {
        let mut n = RuleName {
            len: name.len() as u32,
            ..RuleName::default()
        };
        n.name[..name.len()].copy_from_slice(name.as_bytes());
        n
    }

    fn rules(names: &[&str]) -> Rules {
        Rules {
            source: PathBuf::from("t"),
            rules: names
                .iter()
                .map(|n| Rule {
                    name: (*n).into(),
                    cgroup: PathBuf::from("/"),
                    local_ports: vec![],
                    remote_ports: vec![],
                    remote_cidrs: vec![],
                    action: Action::Off,
                    line: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_rule_keeps_its_slot_by_name_and_gone_rules_keep_theirs_while_they_watch() {
        let mut names = vec![RuleName::default(); RULE_SLOTS];
        names[0] = named("a");
        names[1] = named("gone-but-watching");
        names[2] = named("b");
        let slots = assign_slots(&names, &rules(&["b", "new", "a"]), |s| u64::from(s == 1));
        assert_eq!(slots.unwrap(), vec![2, 3, 0]);
        // Full: the only slot to reclaim is one that watches nothing.
        let mut full: Vec<RuleName> = (0..RULE_SLOTS).map(|i| named(&format!("r{i}"))).collect();
        full[7] = named("idle");
        let slots = assign_slots(&full, &rules(&["x"]), |s| u64::from(s != 7)).unwrap();
        assert_eq!(slots, vec![7]);
        assert!(assign_slots(&full, &rules(&["x"]), |_| 1).is_err());
    }
}
