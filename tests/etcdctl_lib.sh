# Shared by the etcdctl interop scripts (sourced): run etcdctl against $ENDPOINT and compare
# its output with what real etcd 3.4 prints. Needs ENDPOINT and ERR (a temp file) set.

ctl() {
    etcdctl --endpoints="$ENDPOINT" --command-timeout=10s "$@"
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
