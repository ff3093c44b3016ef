#!/usr/bin/env bash
# etcdctl's cluster commands against a running 3-member cluster, given as NAME=CLIENT_URL
# arguments in member order (e.g. n1=http://127.0.0.1:2379 n2=... n3=...): `member list`
# (names and client URLs), `endpoint status --cluster` (one leader, one raft term),
# `endpoint health --cluster`, `move-leader` (then status names the new leader) and puts and
# gets through every endpoint. Exits non-zero at the first failed check.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 NAME=CLIENT_URL... (every member of the cluster)" >&2
    exit 2
fi
export ETCDCTL_API=3
ERR=$(mktemp)
trap 'rm -f "$ERR"' EXIT
NAMES=()
URLS=()
for member in "$@"; do
    NAMES+=("${member%%=*}")
    URLS+=("${member#*=}")
done
ALL=$(IFS=,; echo "${URLS[*]}")
ENDPOINT=$ALL
# shellcheck source=tests/etcdctl_lib.sh
source "$(dirname "$0")/etcdctl_lib.sh"
# How often status is polled for the leader a move-leader named (10 s in all).
LEADER_POLLS=100
LEADER_POLL_S=0.1

# `member list`: every member once, started, with its name and client URL.
members=$(ctl member list)
[[ $(wc -l <<<"$members") -eq $# ]] || fail "member list: want $# members:
$members"
for i in "${!NAMES[@]}"; do
    pattern="^[0-9a-f]+, started, ${NAMES[$i]}, http://127\.0\.0\.1:[0-9]+, ${URLS[$i]}, false$"
    [[ $(grep -cE "$pattern" <<<"$members") -eq 1 ]] || fail "member list: no line for ${NAMES[$i]} at ${URLS[$i]}:
$members"
done
echo "ok: member list"

# status_table: `endpoint status --cluster` as `ENDPOINT ID IS_LEADER RAFT_TERM` lines.
status_table() {
    ctl endpoint status --cluster | awk -F', ' '{ print $1, $2, $5, $7 }' | sort
}

# The id of the one leader; fails unless every member answers, exactly one leads and all
# are in the same raft term.
one_leader() {
    local table
    table=$(status_table)
    [[ $(awk '{ print $1 }' <<<"$table" | tr '\n' ' ') == "$(printf '%s\n' "${URLS[@]}" | sort | tr '\n' ' ')" ]] \
        || fail "endpoint status --cluster: not every member:
$table"
    [[ $(grep -c ' true ' <<<"$table") -eq 1 ]] || fail "endpoint status: not one leader:
$table"
    [[ $(awk '{ print $4 }' <<<"$table" | sort -u | wc -l) -eq 1 ]] \
        || fail "endpoint status: several raft terms:
$table"
    awk '$3 == "true" { print $2 }' <<<"$table"
}
leader=$(one_leader)
echo "ok: endpoint status --cluster (leader $leader)"

health=$(ctl endpoint health --cluster 2>&1)
for url in "${URLS[@]}"; do
    grep -q "^$url is healthy: successfully committed proposal: took = " <<<"$health" \
        || fail "endpoint health --cluster: $url is not healthy:
$health"
done
echo "ok: endpoint health --cluster"

# move-leader to a follower; status must then name it.
target=$(status_table | awk '$3 == "false" { print $2; exit }')
expect "move-leader" "Leadership transferred from $leader to $target" ctl move-leader "$target"
for ((poll = 1; ; poll++)); do
    now=$(one_leader)
    [[ $now == "$target" ]] && break
    ((poll < LEADER_POLLS)) || fail "move-leader: status still names $now, not $target"
    sleep "$LEADER_POLL_S"
done
echo "ok: status names the new leader $target"

# Puts through each endpoint, every one read back through every endpoint (linearizable reads).
for i in "${!URLS[@]}"; do
    expect "put through ${NAMES[$i]}" "OK" \
        etcdctl --endpoints="${URLS[$i]}" --command-timeout=10s put "cluster/${NAMES[$i]}" "from ${NAMES[$i]}"
done
for j in "${!URLS[@]}"; do
    for i in "${!URLS[@]}"; do
        expect "get cluster/${NAMES[$i]} through ${NAMES[$j]}" "from ${NAMES[$i]}" \
            etcdctl --endpoints="${URLS[$j]}" --command-timeout=10s get "cluster/${NAMES[$i]}" --print-value-only
    done
done
# --keys-only prints a blank line after each key.
expect "get --prefix through all endpoints" "$(printf 'cluster/%s\n\n' "${NAMES[@]}")" \
    ctl get cluster/ --prefix --keys-only
echo "all etcdctl cluster checks passed against ${ALL}"
