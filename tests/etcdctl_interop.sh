#!/usr/bin/env bash
# Drives etcdctl (v3 API, etcd 3.4's client) through every KV command family against the
# server at $1 (e.g. http://127.0.0.1:2379) and checks each output against the exact string
# real etcd 3.4 prints. The server must be fresh (empty, at revision 1): the expected
# revisions depend on it. Exits non-zero at the first mismatch, naming the check.
#
# Needs etcdctl and jq on PATH. etcdctl 3.4 has no `get --count-only` (added in 3.5); the
# count is checked through `-w json` instead.
#
# The cluster-level checks (endpoint status, member list) run after all KV checks; watch, lease,
# lock and election checks (which start etcdctl processes in the background) run last.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 <client endpoint, e.g. http://127.0.0.1:2379>" >&2
    exit 2
fi
ENDPOINT=$1
export ETCDCTL_API=3
ERR=$(mktemp)
WORK=$(mktemp -d)
# Background etcdctl processes (watchers, lock holders, campaigners) this script started.
BACKGROUND=()
cleanup() {
    for pid in "${BACKGROUND[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    rm -rf "$ERR" "$WORK"
}
trap cleanup EXIT

# Ids and raft term differ between servers; everything else in a JSON answer is compared.
STRIP_IDS='del(.header.cluster_id, .header.member_id, .header.raft_term)'

# shellcheck source=etcdctl_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/etcdctl_lib.sh"

ctl_json() {
    ctl -w json "$@" | jq -c "$STRIP_IDS"
}

# --- put ------------------------------------------------------------------------------------
expect "put" "OK" ctl put foo bar                                    # revision 2
expect "put --prev-kv" $'OK\nfoo\nbar' ctl put foo baz --prev-kv     # revision 3
expect "put foo/a" "OK" ctl put foo/a 1                              # revision 4
expect "put foo/b" "OK" ctl put foo/b 2                              # revision 5
expect "put fop" "OK" ctl put fop 3                                  # revision 6
expect "put zoo" "OK" ctl put zoo 4                                  # revision 7
expect "put value from stdin" "OK" ctl put stdin < <(printf piped)    # revision 8
expect "put --ignore-value" "OK" ctl put fop --ignore-value          # revision 9
expect_error "put with an unknown lease" "Error: etcdserver: requested lease not found" \
    ctl put foo v --lease=1234abcd
expect_error "put --ignore-value on a missing key" "Error: etcdserver: key not found" \
    ctl put missing --ignore-value

# --- get ------------------------------------------------------------------------------------
expect "get" $'foo\nbaz' ctl get foo
expect "get missing key" "" ctl get missing
expect "get stdin value" $'stdin\npiped' ctl get stdin
expect "get --prefix" $'foo\nbaz\nfoo/a\n1\nfoo/b\n2' ctl get foo --prefix
expect "get range" $'foo\nbaz\nfoo/a\n1\nfoo/b\n2' ctl get foo fop
expect "get --from-key" $'fop\n3\nstdin\npiped\nzoo\n4' ctl get fop --from-key
expect "get --from-key --keys-only" $'foo\n\nfoo/a\n\nfoo/b\n\nfop\n\nstdin\n\nzoo' \
    ctl get foo --from-key --keys-only
expect "get --rev" $'foo\nbar' ctl get foo --rev=2
expect "get --rev before creation" "" ctl get foo/a --rev=3
expect "get --limit" $'foo\nbaz\nfoo/a\n1' ctl get foo --prefix --limit=2
expect "get --sort-by=MODIFY --order=DESCEND --limit" $'foo/b\n2' \
    ctl get foo --prefix --limit=1 --sort-by=MODIFY --order=DESCEND
expect "get --sort-by=VALUE --print-value-only" $'1\n2\nbaz' \
    ctl get foo --prefix --sort-by=VALUE --order=ASCEND --print-value-only
expect "get --sort-by=KEY --order=DESCEND --keys-only" $'fop\n\nfoo/b\n\nfoo/a\n\nfoo' \
    ctl get fo --prefix --sort-by=KEY --order=DESCEND --keys-only
expect "get --sort-by=CREATE --order=DESCEND" $'3\n2\n1\nbaz' \
    ctl get fo --prefix --sort-by=CREATE --order=DESCEND --print-value-only
expect "get --sort-by=VERSION --order=DESCEND" $'baz\n3\n1\n2' \
    ctl get fo --prefix --sort-by=VERSION --order=DESCEND --print-value-only
expect "get --consistency=s" $'foo\nbaz' ctl get foo --consistency=s
expect "get -w json" \
    '{"header":{"revision":9},"kvs":[{"key":"Zm9v","create_revision":2,"mod_revision":3,"version":2,"value":"YmF6"},{"key":"Zm9vL2E=","create_revision":4,"mod_revision":4,"version":1,"value":"MQ=="}],"more":true,"count":3}' \
    ctl_json get foo --prefix --limit=2
expect "get -w json --keys-only (ignore-value bumped the version, kept the value)" \
    '{"header":{"revision":9},"kvs":[{"key":"Zm9w","create_revision":6,"mod_revision":9,"version":2}],"count":1}' \
    ctl_json get fop --keys-only
expect "get -w json missing key" '{"header":{"revision":9}}' ctl_json get missing
expect_error "get a future revision" "Error: etcdserver: mvcc: required revision is a future revision" \
    ctl get foo --rev=1000

# --- del ------------------------------------------------------------------------------------
expect "del --prev-kv" $'1\nfoo/a\n1' ctl del foo/a --prev-kv            # revision 10
expect "del missing key" "0" ctl del missing
expect "del --prefix" "3" ctl del fo --prefix                             # revision 11
expect "del --from-key --prev-kv" $'2\nstdin\npiped\nzoo\n4' ctl del s --from-key --prev-kv # 12
expect "del -w json" '{"header":{"revision":12}}' ctl_json del nothing
expect "empty after deletes" "" ctl get "" --from-key

# --- txn (non-interactive, from stdin) ------------------------------------------------------
# Sections: compares, blank line, success ops, blank line, failure ops, blank line; an empty
# section is just its blank line.
expect "txn put" "OK" ctl put x 1                                         # revision 13
expect "txn success branch" $'SUCCESS\n\nOK\n\nx\n2' ctl txn <<'EOF'
value("x") = "1"

put x 2
get x

put x 3

EOF
# revision 14
expect "txn failure branch" $'FAILURE\n\nOK\n\nx\n3' ctl txn <<'EOF'
mod("x") > "100"
version("x") = "2"

put x 4

put x 3
get x

EOF
# revision 15
expect "txn -w json" \
    '{"header":{"revision":16},"succeeded":true,"responses":[{"Response":{"ResponsePut":{"header":{"revision":16}}}},{"Response":{"ResponseDeleteRange":{"header":{"revision":16},"deleted":1}}}]}' \
    ctl_json txn <<'EOF'
create("y") = "0"
create("x") > "0"

put y 1
del x


EOF
# revision 16
expect_error "txn duplicate key" "Error: etcdserver: duplicate key given in txn request" ctl txn <<'EOF'


put y 2
del y


EOF

# --- compaction -----------------------------------------------------------------------------
expect "compaction" "compacted revision 5" ctl compaction 5
expect "compaction --physical" "compacted revision 14" ctl compaction --physical 14
expect_error "get a compacted revision" "Error: etcdserver: mvcc: required revision has been compacted" \
    ctl get x --rev=13
expect "get at the compaction revision" $'x\n2' ctl get x --rev=14
expect_error "compaction of a compacted revision" "Error: etcdserver: mvcc: required revision has been compacted" \
    ctl compaction 10
expect_error "compaction of a future revision" "Error: etcdserver: mvcc: required revision is a future revision" \
    ctl compaction 1000

# --- endpoint health ------------------------------------------------------------------------
# etcdctl 3.4 prints the simple form to stderr; the JSON form goes to stdout.
expect "endpoint health -w json" "[{\"endpoint\":\"${ENDPOINT}\",\"health\":true}]" \
    bash -c "etcdctl --endpoints='${ENDPOINT}' endpoint health -w json | jq -c 'map(del(.took))'"

# --- endpoint status --------------------------------------------------------------------------
# A single member is its own leader; the version string is not compared. Per-endpoint commands
# dial with grpc-go's passthrough resolver, which sends the `http://host:port` endpoint verbatim
# as HTTP/2 :authority (vendor/h2/FERROCD-PATCH.md): both spellings of the endpoint must work.
HOSTPORT=${ENDPOINT#http://}
for EP in "$ENDPOINT" "$HOSTPORT"; do
    expect "endpoint status -w json ($EP)" \
        "{\"Endpoint\":\"${EP}\",\"revision\":16,\"leader_is_self\":true,\"has_version\":true}" \
        bash -c "etcdctl --endpoints='${EP}' endpoint status -w json | jq -c '.[0] | {Endpoint, revision: .Status.header.revision, leader_is_self: (.Status.leader == .Status.header.member_id), has_version: (.Status.version | length > 0)}'"
done

# --- maintenance ----------------------------------------------------------------------------
# Hash values are each server's own (etcd hashes its bbolt records); their behaviour is compared:
# stable, revision-dependent, refused below the compaction and beyond the current revision.
hashkv() {
    etcdctl --endpoints="$ENDPOINT" endpoint hashkv -w json "$@" | jq -c '.[0].HashKV'
}
expect "endpoint hashkv -w json" \
    "{\"Endpoint\":\"${ENDPOINT}\",\"revision\":16,\"compact_revision\":14,\"has_hash\":true}" \
    bash -c "etcdctl --endpoints='${ENDPOINT}' endpoint hashkv -w json | jq -c '.[0] | {Endpoint, revision: .HashKV.header.revision, compact_revision: .HashKV.compact_revision, has_hash: (.HashKV.hash > 0)}'"
HASH_NOW=$(hashkv | jq .hash)
HASH_16=$(hashkv --rev 16 | jq .hash)
HASH_15=$(hashkv --rev 15 | jq .hash)
[[ "$HASH_NOW" == "$HASH_16" ]] || fail "hashkv at the current revision ($HASH_NOW) != hashkv --rev 16 ($HASH_16)"
[[ "$HASH_15" != "$HASH_16" ]] || fail "hashkv --rev 15 == --rev 16 although revision 16 wrote"
echo "ok: hashkv is stable and depends on the revision"
expect_error "hashkv of a compacted revision" "Error: etcdserver: mvcc: required revision has been compacted" \
    ctl endpoint hashkv --rev 13
expect_error "hashkv of a future revision" "Error: etcdserver: mvcc: required revision is a future revision" \
    ctl endpoint hashkv --rev 1000
expect "defrag" "Finished defragmenting etcd member[${ENDPOINT}]" ctl defrag
# etcdctl streams the snapshot to a file and checks etcd's trailer convention (a sha256 after
# 512-byte multiples); ferrocd's own format follows it (restore: tests/snapshot.rs).
expect "snapshot save" "Snapshot saved at ${WORK}/snap.db" ctl snapshot save "${WORK}/snap.db"
(( $(stat -c %s "${WORK}/snap.db") % 512 == 32 )) || fail "snapshot size is not 32 + n * 512"
echo "ok: snapshot file ends with a sha256 after 512-byte multiples"
expect "alarm list" "" ctl alarm list
expect "alarm disarm" "" ctl alarm disarm
expect_error "move-leader on a single member" "Error: etcdserver: bad leader transferee" \
    ctl move-leader 1234

# --- member list ----------------------------------------------------------------------------
expect_match "member list" \
    "^[0-9a-f]+, started, [^,]+, http://127\.0\.0\.1:[0-9]+, ${ENDPOINT}, false$" \
    ctl member list

# Long-running etcdctl commands (watch, elect) print as events arrive; the script waits for
# their output by polling the file they write, bounded by this deadline.
OUTPUT_DEADLINE_S=20

# wait_for_lines NAME FILE COUNT: until FILE has COUNT lines, or fail at the deadline.
wait_for_lines() {
    local name=$1 file=$2 count=$3 deadline=$((SECONDS + OUTPUT_DEADLINE_S))
    while (( $(wc -l < "$file") < count )); do
        (( SECONDS < deadline )) || fail "$name: waited ${OUTPUT_DEADLINE_S}s for $count lines, got:
$(cat "$file")"
        sleep 0.05
    done
}

# in_background FILE ARGS...: runs `etcdctl ARGS` (itself, not a subshell, so signals reach it)
# with its output in FILE; its PID in $!.
in_background() {
    local file=$1
    shift
    : >"$file" # exists before the child opens it, for wait_for_lines
    etcdctl --endpoints="$ENDPOINT" --command-timeout=10s "$@" >>"$file" 2>&1 &
    BACKGROUND+=($!)
}

# --- watch ------------------------------------------------------------------------------------
expect "put w/1" "OK" ctl put w/1 a                                  # revision 17
expect "put w/2" "OK" ctl put w/2 b                                  # revision 18
expect "del w/1" "1" ctl del w/1                                     # revision 19
expect "put w/2 again" "OK" ctl put w/2 c                            # revision 20
# History from revision 17, with each event's previous kv (a delete prints the deleted key's last
# version, then the key with an empty value).
in_background "$WORK/history" watch --rev=17 --prefix w/ --prev-kv
WATCHER=$!
wait_for_lines "watch --rev --prefix --prev-kv" "$WORK/history" 16
kill "$WATCHER"
expect "watch --rev=17 --prefix w/ --prev-kv" \
    $'PUT\nw/1\na\nPUT\nw/2\nb\nDELETE\nw/1\na\nw/1\n\nPUT\nw/2\nb\nw/2\nc' \
    head -n 16 "$WORK/history"
# A watch from the next revision sees the next write, whether it registered before it or not.
in_background "$WORK/live" watch --rev=21 live
WATCHER=$!
expect "put live" "OK" ctl put live x                                # revision 21
wait_for_lines "watch --rev=21 live" "$WORK/live" 3
kill "$WATCHER"
expect "watch a future revision" $'PUT\nlive\nx' head -n 3 "$WORK/live"

# --- lease --------------------------------------------------------------------------------------
GRANTED=$(ctl lease grant 60)
[[ "$GRANTED" =~ ^lease\ ([0-9a-f]+)\ granted\ with\ TTL\(60s\)$ ]] || fail "lease grant: $GRANTED"
LEASE=${BASH_REMATCH[1]}
echo "ok: lease grant"
expect "lease list" $'found 1 leases\n'"$LEASE" ctl lease list
expect "put --lease" "OK" ctl put --lease="$LEASE" lk v                # revision 22
expect_match "lease timetolive --keys" \
    "^lease $LEASE granted with TTL\(60s\), remaining\((59|60)s\), attached keys\(\[lk\]\)$" \
    ctl lease timetolive "$LEASE" --keys
expect "lease keep-alive --once" "lease $LEASE keepalived with TTL(60)" \
    ctl lease keep-alive --once "$LEASE"
expect "lease revoke" "lease $LEASE revoked" ctl lease revoke "$LEASE"  # revision 23
expect "the revoked lease's key is gone" "" ctl get lk
expect "lease timetolive of a revoked lease" "lease $LEASE already expired" \
    ctl lease timetolive "$LEASE"
expect_error "lease revoke of a revoked lease" \
    "Error: failed to revoke lease (etcdserver: requested lease not found)" \
    ctl lease revoke "$LEASE"

# --- lock -------------------------------------------------------------------------------------
# Two etcdctl processes run a critical section under one lock; the sections must not overlap. The
# pause inside a section gives an overlap the chance to show; it synchronises nothing.
LOCKERS=()
for i in 1 2; do
    in_background "$WORK/locker-$i" lock critical -- \
        sh -c "echo start-$i >> '$WORK/sections'; sleep 0.3; echo end-$i >> '$WORK/sections'"
    LOCKERS+=($!)
done
for pid in "${LOCKERS[@]}"; do
    wait "$pid" || fail "lock: a contender failed: $(cat "$WORK"/locker-*)"
done
SECTIONS=$(tr '\n' ' ' < "$WORK/sections")
[[ "$SECTIONS" == "start-1 end-1 start-2 end-2 " || "$SECTIONS" == "start-2 end-2 start-1 end-1 " ]] \
    || fail "lock: critical sections overlapped: $SECTIONS"
echo "ok: lock (two contenders, mutual exclusion)"
expect "lock keys are gone after both exit" "" ctl get --prefix critical/

# --- elect ------------------------------------------------------------------------------------
in_background "$WORK/campaign" elect vote p1
CAMPAIGNER=$!
wait_for_lines "elect (campaign)" "$WORK/campaign" 2
in_background "$WORK/observe" elect -l vote
OBSERVER=$!
wait_for_lines "elect -l (observe)" "$WORK/observe" 2
expect_match "elect -l shows the leader" $'^vote/[0-9a-f]+\np1$' head -n 2 "$WORK/observe"
expect_match "the campaigner printed its key" $'^vote/[0-9a-f]+\np1$' head -n 2 "$WORK/campaign"
# On SIGTERM (or SIGINT) etcdctl resigns: the leader key goes. (A non-interactive shell starts
# background commands with SIGINT ignored, so SIGTERM it is.)
kill -TERM "$CAMPAIGNER"
wait "$CAMPAIGNER" || true
expect "the resigned leader's key is gone" "" ctl get --prefix vote/
kill "$OBSERVER"

echo "all etcdctl checks passed against ${ENDPOINT}"
