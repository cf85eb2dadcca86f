//! The kernel struct offsets host mode's programs read, from this kernel's BTF.

use crate::activity::kernel_btf::{BtfError, KernelBtf};

/// `(global in the BPF object, offset)` pairs for `EbpfLoader::override_global`.
pub(crate) fn read(btf: &KernelBtf) -> Result<Vec<(&'static str, u32)>, BtfError> {
    let of = |s: &str, p: &str| btf.offset_of(s, p);
    // `struct kernfs_node::parent` became `__parent` (an RCU pointer) in Linux 6.15.
    let kn_parent = of("kernfs_node", "__parent").or_else(|_| of("kernfs_node", "parent"))?;
    Ok(vec![
        ("HOST_SK_ERR_OFF", of("sock", "sk_err")?),
        (
            "HOST_PROBES_OUT_OFF",
            of("inet_connection_sock", "icsk_probes_out")?,
        ),
        (
            "HOST_RETRANSMITS_OFF",
            of("inet_connection_sock", "icsk_retransmits")?,
        ),
        ("HOST_SND_WND_OFF", of("tcp_sock", "snd_wnd")?),
        ("HOST_SK_CGROUP_OFF", of("sock", "sk_cgrp_data.cgroup")?),
        ("HOST_CGROUP_KN_OFF", of("cgroup", "kn")?),
        ("HOST_KN_ID_OFF", of("kernfs_node", "id")?),
        ("HOST_KN_PARENT_OFF", kn_parent),
        ("HOST_FAMILY_OFF", of("sock_common", "skc_family")?),
        ("HOST_STATE_OFF", of("sock_common", "skc_state")?),
        ("HOST_NUM_OFF", of("sock_common", "skc_num")?),
        ("HOST_DPORT_OFF", of("sock_common", "skc_dport")?),
        ("HOST_DADDR_OFF", of("sock_common", "skc_daddr")?),
        ("HOST_SADDR_OFF", of("sock_common", "skc_rcv_saddr")?),
        ("HOST_V6_DADDR_OFF", of("sock_common", "skc_v6_daddr")?),
        ("HOST_V6_SADDR_OFF", of("sock_common", "skc_v6_rcv_saddr")?),
        ("HOST_RCV_TSTAMP_OFF", of("tcp_sock", "rcv_tstamp")?),
        ("HOST_LSNDTIME_OFF", of("tcp_sock", "lsndtime")?),
        (
            "HOST_LRCVTIME_OFF",
            of("inet_connection_sock", "icsk_ack.lrcvtime")?,
        ),
        ("HOST_SOCKET_SK_OFF", of("socket", "sk")?),
        ("HOST_COOKIE_OFF", of("sock_common", "skc_cookie")?),
        ("HOST_SK_STORAGE_OFF", of("sock", "sk_bpf_storage")?),
        ("HOST_TASK_TGID_OFF", of("task_struct", "tgid")?),
        ("HOST_TASK_CGROUPS_OFF", of("task_struct", "cgroups")?),
        ("HOST_CSS_DFL_CGRP_OFF", of("css_set", "dfl_cgrp")?),
        ("HOST_TASK_COMM_OFF", of("task_struct", "comm")?),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field the programs read exists in this kernel, and the `sock` fields sit where
    /// `tcp_sock` has them (the programs rely on `tcp_sock` beginning with `sock`).
    #[test]
    fn this_kernel_has_every_field() {
        let Some(btf) = crate::activity::kernel_btf::this_kernels_btf() else {
            return;
        };
        let offsets = read(&btf).expect("every field");
        let get = |name: &str| offsets.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(
            btf.offset_of("tcp_sock", "inet_conn.icsk_inet.sk.sk_cgrp_data.cgroup")
                .unwrap(),
            get("HOST_SK_CGROUP_OFF")
        );
        assert_eq!(
            btf.offset_of("tcp_sock", "inet_conn.icsk_inet.sk.__sk_common.skc_state")
                .unwrap(),
            get("HOST_STATE_OFF")
        );
        assert!(get("HOST_COOKIE_OFF") > 0);
    }
}
