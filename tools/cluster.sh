#!/usr/bin/env bash
# Starts a local 3-member cluster on 127.0.0.1 (like etcd's Procfile), prints its endpoints,
# and stops all three members (by PID) on Ctrl-C or when one of them exits.
#
#   tools/cluster.sh [--etcd] [--dir DIR] [--bin PATH] [--ports C1:P1,C2:P2,C3:P3] [-- FLAGS...]
#
#   --etcd    run the real etcd binary instead of ferrocd (to compare)
#   --dir     parent of the three data dirs (default: a new temporary dir, removed at the end;
#             a given dir is kept, so a second run restarts the same members)
#   --bin     the server binary (default: target/release/ferrocd, or `etcd` with --etcd)
#   --ports   client:peer ports of the three members (default 2379:2380,22379:22380,32379:32380)
#   FLAGS     extra flags for every member (e.g. --shards 2)
#
# Logs go to DIR/m1.log, DIR/m2.log, DIR/m3.log.
set -euo pipefail

flavor=ferrocd
dir=""
bin=""
ports="2379:2380,22379:22380,32379:32380"
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --etcd) flavor=etcd; shift ;;
        --dir) dir="$2"; shift 2 ;;
        --bin) bin="$2"; shift 2 ;;
        --ports) ports="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [[ -z "$bin" ]]; then
    if [[ "$flavor" == etcd ]]; then bin=etcd; else bin="$(dirname "$0")/../target/release/ferrocd"; fi
fi
command -v "$bin" >/dev/null || { echo "no server binary $bin (cargo build --release?)" >&2; exit 2; }
keep_dir=1
if [[ -z "$dir" ]]; then
    dir="$(mktemp -d -t "$flavor-cluster.XXXXXX")"
    keep_dir=0
fi
mkdir -p "$dir"

IFS=',' read -r -a pairs <<<"$ports"
[[ ${#pairs[@]} -eq 3 ]] || { echo "--ports needs three client:peer pairs" >&2; exit 2; }
names=(m1 m2 m3)
cluster=""
for i in 0 1 2; do
    cluster+="${cluster:+,}${names[$i]}=http://127.0.0.1:${pairs[$i]#*:}"
done

pids=()
stop() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ $keep_dir -eq 0 ]]; then rm -rf "$dir"; fi
    echo "stopped"
    exit 0
}
trap stop INT TERM EXIT

endpoints=""
for i in 0 1 2; do
    name=${names[$i]}
    client="http://127.0.0.1:${pairs[$i]%%:*}"
    peer="http://127.0.0.1:${pairs[$i]#*:}"
    "$bin" --name "$name" --data-dir "$dir/$name" \
        --listen-client-urls "$client" --advertise-client-urls "$client" \
        --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
        --initial-cluster "$cluster" --initial-cluster-token "$flavor-cluster-1" \
        --initial-cluster-state new ${extra[@]+"${extra[@]}"} >"$dir/$name.log" 2>&1 &
    pids+=($!)
    endpoints+="${endpoints:+,}$client"
    echo "$name: pid $! client $client peer $peer log $dir/$name.log"
done
echo "endpoints: $endpoints"
echo "try: ETCDCTL_API=3 etcdctl --endpoints $endpoints member list -w table"
echo "     ETCDCTL_API=3 etcdctl --endpoints $endpoints endpoint status --cluster -w table"
echo "Ctrl-C stops the cluster"
# Polls (a trapped signal runs `stop` within a second) until any member exits; the others are
# then stopped too. (`wait -n` defers the trap until a child exits.)
all_running() {
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || return 1; done
}
while all_running; do sleep 1; done
keep_dir=1
echo "a member exited; see its log in $dir" >&2
