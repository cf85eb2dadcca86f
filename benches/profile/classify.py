#!/usr/bin/env python3
"""Sorts one strategy's perf samples (see real-profile.sh) by process role and by the system
call, or user space, each sample was in. One sample is 1/199 s of one CPU."""
import collections
import subprocess
import sys

HZ = 199
SECONDS = 20

# First match wins, in this order: a send that delivers a packet on loopback runs the
# receiver's TCP (and any cgroup_skb programs) inside it, so delivery is counted apart below.
CATEGORIES = [
    ("getsockopt (TCP_INFO)", {"__x64_sys_getsockopt"}),
    ("io_uring SEND", {"io_send", "io_sendmsg"}),
    ("io_uring RECV/READ", {"io_recv", "io_recvmsg", "io_read", "__io_read"}),
    ("io_uring WRITE", {"io_write", "__io_write"}),
    ("io_uring task work", {"io_poll_task_func", "tctx_task_work", "io_handle_tw_list"}),
    ("send/write syscall", {"__sys_sendto", "ksys_write"}),
    ("recv/read syscall", {"__sys_recvfrom", "ksys_read"}),
    ("epoll_wait", {"do_epoll_wait"}),
    ("io_uring_enter, other", {"__do_sys_io_uring_enter"}),
    ("futex", {"__x64_sys_futex"}),
    ("schedule", {"__schedule"}),
    ("softirq in an interrupt", {"handle_softirqs"}),
]


def main():
    out, strategy = sys.argv[1], sys.argv[2]
    roles = {}
    with open(f"{out}/{strategy}.pids") as f:
        for line in f:
            pid, _binary, role = line.split()[:3]
            roles[int(pid)] = role
    script = subprocess.run(
        ["perf", "script", "-i", f"{out}/{strategy}.data", "-F", "pid,tid,ip,sym"],
        capture_output=True, text=True, check=True,
    ).stdout
    by_role = collections.defaultdict(collections.Counter)
    delivery = collections.Counter()
    bpf = collections.Counter()
    for sample in script.split("\n\n"):
        lines = [l for l in sample.strip().split("\n") if l.strip()]
        if len(lines) < 2:
            continue
        role = roles.get(int(lines[0].split()[0].split("/")[0]))
        if role is None:
            continue
        frames = [l.split()[1].split("+")[0] for l in lines[1:] if len(l.split()) >= 2]
        in_kernel = lines[1].split()[0].startswith("ffffffff")
        names = set(frames)
        category = "user space"
        if in_kernel:
            category = next((c for c, syms in CATEGORIES if syms & names), "kernel, other")
        by_role[role][category] += 1
        if "net_rx_action" in names:
            delivery[role] += 1
        if "__cgroup_bpf_run_filter_skb" in names:
            bpf[role] += 1
    ms = lambda n: n * 1000 / HZ / SECONDS
    for role, counts in sorted(by_role.items()):
        total = sum(counts.values())
        print(f"{strategy} {role}s: {ms(total):.0f} ms of CPU a second ({total} samples); "
              f"packet delivery {ms(delivery[role]):.0f} ms/s, cgroup_skb programs "
              f"{ms(bpf[role]):.1f} ms/s (both inside the rows below)")
        for category, n in counts.most_common():
            print(f"    {category:26} {ms(n):6.1f} ms/s  {100 * n / total:5.1f}%")


if __name__ == "__main__":
    main()
