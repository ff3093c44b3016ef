#!/usr/bin/env bash
# Runs etcdctl's own health benchmarks against the server at $1 (e.g. http://127.0.0.1:2379):
# `check perf --load s` (50 clients writing 150 puts/s for 60 s; passes on throughput, slowest
# request under 500 ms and latency stddev) and `check datascale --load s` (10,000 keys, memory
# read from /metrics), each followed by etcdctl's compaction and defragmentation. Exits
# non-zero at the first FAIL, naming the check.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 <client endpoint, e.g. http://127.0.0.1:2379>" >&2
    exit 2
fi
ENDPOINT=$1
export ETCDCTL_API=3
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

# check NAME ARGS...: etcdctl check succeeds and prints a final PASS, no FAIL line.
check() {
    local name=$1
    shift
    if ! etcdctl --endpoints="$ENDPOINT" check "$@" --auto-compact --auto-defrag >"$OUT" 2>&1; then
        echo "FAIL: check $name: etcdctl failed:" >&2
        tr '\r' '\n' <"$OUT" | grep -v '^ *[0-9]* / ' >&2
        exit 1
    fi
    # The progress bar redraws with carriage returns; the verdicts are whole lines.
    local verdicts
    verdicts=$(tr '\r' '\n' <"$OUT" | grep -E '^(PASS|FAIL)')
    echo "$verdicts"
    if grep -q '^FAIL' <<<"$verdicts" || [[ "$(tail -n 1 <<<"$verdicts")" != PASS* ]]; then
        echo "FAIL: check $name" >&2
        exit 1
    fi
    echo "ok: check $name"
}

check perf perf --load s
check datascale datascale --load s

echo "all etcdctl checks passed against ${ENDPOINT}"
