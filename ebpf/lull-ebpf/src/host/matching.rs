//! Which rule a connection falls under: by the socket's cgroup (and its ancestors), then
//! ports and CIDRs, first match wins. Runs once per connection, at establishment (or when the
//! pickup iterator meets it).

use aya_ebpf::maps::lpm_trie::Key;
use lull_common::host::{
    CgroupKey, CidrKey, MAX_CGROUP_DEPTH, MAX_RULES, RuleSpec, port_word_index, rule_flags,
};

use super::{
    HOST_BANKS, HOST_CGROUP_KN_OFF, HOST_CGROUPS, HOST_CIDRS, HOST_CONFIG, HOST_KN_ID_OFF,
    HOST_KN_PARENT_OFF, HOST_PORTS, HOST_SK_CGROUP_OFF,
    util::{off, read_kernel},
};

pub(super) enum Match {
    /// No rule matches, or the first match is `off`.
    None,
    /// The socket's cgroup could not be read.
    NoCgroup,
    /// This rule applies.
    Rule(RuleSpec),
}

/// The first rule of the bank in force whose cgroup holds the socket (at any depth) and whose
/// ports and CIDRs match.
#[inline(always)]
pub(super) fn match_rule(
    tp: *const u8,
    local_port: u16,
    remote_port: u16,
    remote: &[u8; 16],
) -> Match {
    let Some(config) = HOST_CONFIG.get(0) else {
        return Match::None;
    };
    let bank = config.active_bank & 1;
    let Some(mask) = cgroup_mask(tp, bank) else {
        return Match::NoCgroup;
    };
    if mask == 0 {
        return Match::None;
    }
    let Some(rules) = HOST_BANKS.get(bank) else {
        return Match::None;
    };
    let count = rules.count;
    for position in 0..MAX_RULES as u32 {
        if position >= count || mask >> position == 0 {
            break;
        }
        if mask >> position & 1 == 0 {
            continue;
        }
        let spec = rules.rules[position as usize];
        if spec.flags & rule_flags::LOCAL_PORTS != 0
            && !port_listed(bank, position, false, local_port)
        {
            continue;
        }
        if spec.flags & rule_flags::REMOTE_PORTS != 0
            && !port_listed(bank, position, true, remote_port)
        {
            continue;
        }
        if spec.flags & rule_flags::REMOTE_CIDRS != 0 {
            let key = Key::new(
                16 + 128,
                CidrKey {
                    bank: bank as u8,
                    position: position as u8,
                    addr: *remote,
                },
            );
            if HOST_CIDRS.get(&key).is_none() {
                continue;
            }
        }
        if spec.flags & rule_flags::OFF != 0 {
            return Match::None;
        }
        return Match::Rule(spec);
    }
    Match::None
}

#[inline(always)]
fn port_listed(bank: u32, position: u32, remote: bool, port: u16) -> bool {
    HOST_PORTS
        .get(port_word_index(bank, position, remote, port))
        .is_some_and(|word| word >> (port & 63) & 1 == 1)
}

/// The rule positions whose cgroup is the socket's cgroup or one of its ancestors. `None`
/// if the socket's cgroup cannot be read.
#[inline(always)]
fn cgroup_mask(tp: *const u8, bank: u32) -> Option<u64> {
    // SAFETY: bpf_probe_read_kernel checks the address itself and fills zeros on failure;
    // the offset comes from this kernel's BTF.
    let cgroup = unsafe { read_kernel::<u64>(tp.add(off(&HOST_SK_CGROUP_OFF))) };
    cgroup_mask_of(cgroup, bank)
}

/// Whether any rule of the bank in force names the cgroup at `cgroup` (a `struct cgroup *`,
/// as a number) or one of its ancestors.
#[inline(always)]
pub(super) fn any_rule_covers(cgroup: u64) -> bool {
    let Some(config) = HOST_CONFIG.get(0) else {
        return false;
    };
    cgroup_mask_of(cgroup, config.active_bank & 1).is_some_and(|m| m != 0)
}

/// The rule positions whose cgroup is `cgroup` (a `struct cgroup *`, as a number) or one of
/// its ancestors: one [`HOST_CGROUPS`] lookup per level, walking up the kernfs nodes.
#[inline(always)]
fn cgroup_mask_of(cgroup: u64, bank: u32) -> Option<u64> {
    if cgroup == 0 {
        return None;
    }
    // SAFETY (the reads below): bpf_probe_read_kernel checks the address itself and fills
    // zeros on failure; the offsets come from this kernel's BTF.
    // SAFETY: see above.
    let mut kn = unsafe { read_kernel::<u64>((cgroup as *const u8).add(off(&HOST_CGROUP_KN_OFF))) };
    if kn == 0 {
        return None;
    }
    let mut mask = 0u64;
    for _ in 0..MAX_CGROUP_DEPTH {
        if kn == 0 {
            break;
        }
        let node = kn as *const u8;
        let key = CgroupKey {
            // SAFETY: see above.
            cgroup_id: unsafe { read_kernel::<u64>(node.add(off(&HOST_KN_ID_OFF))) },
            bank,
            _pad: 0,
        };
        // SAFETY: a read-only lookup; the value is a plain u64.
        if let Some(m) = unsafe { HOST_CGROUPS.get(&key) } {
            mask |= *m;
        }
        // SAFETY: see above.
        kn = unsafe { read_kernel::<u64>(node.add(off(&HOST_KN_PARENT_OFF))) };
    }
    Some(mask)
}
