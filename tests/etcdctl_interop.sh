#!/usr/bin/env bash
# Drives etcdctl (v3 API, etcd 3.4's client) through every KV command family against the
# server at $1 (e.g. http://127.0.0.1:2379) and checks each output against the exact string
# real etcd 3.4 prints. The server must be fresh (empty, at revision 1): the expected
# revisions depend on it. Exits non-zero at the first mismatch, naming the check.
#
# Needs etcdctl and jq on PATH. etcdctl 3.4 has no `get --count-only` (added in 3.5); the
# count is checked through `-w json` instead.
#
# The cluster-level checks (endpoint status, member list) run last, after all KV checks.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 <client endpoint, e.g. http://127.0.0.1:2379>" >&2
    exit 2
fi
ENDPOINT=$1
export ETCDCTL_API=3
ERR=$(mktemp)
trap 'rm -f "$ERR"' EXIT

# Ids and raft term differ between servers; everything else in a JSON answer is compared.
STRIP_IDS='del(.header.cluster_id, .header.member_id, .header.raft_term)'

ctl() {
    etcdctl --endpoints="$ENDPOINT" --command-timeout=10s "$@"
}

ctl_json() {
    ctl -w json "$@" | jq -c "$STRIP_IDS"
}

fail() {
    echo "FAIL: $1" >&2
    exit 1
}

# expect NAME EXPECTED_STDOUT COMMAND...: the command succeeds and prints exactly that.
expect() {
    local name=$1 expected=$2 actual
    shift 2
    if ! actual=$("$@" 2>"$ERR"); then
        fail "$name: command failed: $*
$(cat "$ERR")"
    fi
    if [[ "$actual" != "$expected" ]]; then
        fail "$name: $*
--- expected ---
$expected
--- actual ---
$actual"
    fi
    echo "ok: $name"
}

# expect_error NAME EXPECTED_LAST_STDERR_LINE COMMAND...: the command fails with that error.
expect_error() {
    local name=$1 expected=$2 actual
    shift 2
    if "$@" >/dev/null 2>"$ERR"; then
        fail "$name: command succeeded, expected: $expected"
    fi
    actual=$(tail -n 1 "$ERR")
    if [[ "$actual" != "$expected" ]]; then
        fail "$name: $*
--- expected error ---
$expected
--- actual stderr ---
$(cat "$ERR")"
    fi
    echo "ok: $name"
}

# expect_match NAME EXTENDED_REGEX COMMAND...: for outputs with timings or ids in them.
expect_match() {
    local name=$1 pattern=$2 actual
    shift 2
    if ! actual=$("$@" 2>"$ERR"); then
        fail "$name: command failed: $*
$(cat "$ERR")"
    fi
    if ! [[ "$actual" =~ $pattern ]]; then
        fail "$name: $*
--- expected to match ---
$pattern
--- actual ---
$actual"
    fi
    echo "ok: $name"
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
expect "alarm list" "" ctl alarm list
expect "alarm disarm" "" ctl alarm disarm
expect_error "move-leader on a single member" "Error: etcdserver: bad leader transferee" \
    ctl move-leader 1234

# --- member list ----------------------------------------------------------------------------
expect_match "member list" \
    "^[0-9a-f]+, started, [^,]+, http://127\.0\.0\.1:[0-9]+, ${ENDPOINT}, false$" \
    ctl member list

echo "all etcdctl checks passed against ${ENDPOINT}"
