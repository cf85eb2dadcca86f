#!/usr/bin/env bash
# Where each strategy's CPU goes in the `real` benchmark: runs one strategy at a time, samples
# every CPU with perf for 20 s of its measurement window, and sorts the samples of its worker
# and peer processes by the system call (or user space) they were in.
#
# Usage, as root, from the workspace root:
#   [MIX=standard|busy_heavy] benches/profile/real-profile.sh [CONNS] [STRATEGY...]
# e.g. benches/profile/real-profile.sh 60000 lull-ebpf lull-tcpinfo tokio
# Needs perf and python3; output in target/profile/.
set -euo pipefail
cd "$(dirname "$0")/../.."
conns=${1:-60000}
shift || true
strategies=("${@:-lull-ebpf lull-tcpinfo tokio}")
out=target/profile
mkdir -p "$out"
cargo build --release --package lull-benches --bin real
for s in ${strategies[@]}; do
    ./target/release/real --conns "$conns" --strategies "$s" --mixes "${MIX:-standard}" \
        --no-vanishing --out "$out/$s" \
        >"$out/$s.out" 2>"$out/$s.err" &
    run=$!
    # The window opens once every connection is up; give it a few seconds to settle.
    for _ in $(seq 1 180); do
        grep -q "connections up" "$out/$s.err" && break
        sleep 1
    done
    sleep 3
    ps -eo pid,args | grep -E "real (worker|peer)" | grep -v grep >"$out/$s.pids"
    perf record -a -g -F 199 -o "$out/$s.data" -- sleep 20 2>"$out/$s.perf.err"
    wait "$run"
    grep "probes," "$out/$s.err"
    python3 benches/profile/classify.py "$out" "$s"
done
