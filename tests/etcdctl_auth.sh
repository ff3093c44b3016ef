#!/usr/bin/env bash
# Drives etcdctl's auth commands (user, role, grant-permission, auth enable/disable, --user)
# against the server at $1 (e.g. http://127.0.0.1:2379) and checks each output against the
# exact string real etcd 3.4 prints. The server must be fresh (no users, auth disabled).
# Exits non-zero at the first mismatch, naming the check.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 <client endpoint, e.g. http://127.0.0.1:2379>" >&2
    exit 2
fi
ENDPOINT=$1
export ETCDCTL_API=3
ERR=$(mktemp)
trap 'rm -f "$ERR"' EXIT

# shellcheck source=etcdctl_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/etcdctl_lib.sh"

ROOT=(--user root:rootpw)
ALICE=(--user alice:alicepw)

expect "put before auth" "OK" ctl put app/x 1
expect "put outside the grant" "OK" ctl put other 1
expect_error "auth enable without root" "Error: etcdserver: root user does not exist" \
    ctl auth enable
expect "user add root" "User root created" ctl user add root --new-user-password=rootpw
expect "role add" "Role app created" ctl role add app
expect_error "role add existing" "Error: etcdserver: role name already exists" ctl role add app
expect "role grant-permission --prefix" "Role app updated" \
    ctl role grant-permission app readwrite app/ --prefix
expect "role grant-permission read" "Role app updated" ctl role grant-permission app read ro
expect "role get" $'Role app\nKV Read:\n\t[app/, app0) (prefix app/)\n\tro\nKV Write:\n\t[app/, app0) (prefix app/)' \
    ctl role get app
expect "user add alice" "User alice created" ctl user add alice --new-user-password=alicepw
expect "user grant-role" "Role app is granted to user alice" ctl user grant-role alice app
expect_error "grant a missing role" "Error: etcdserver: role name not found" \
    ctl user grant-role alice nope
expect "user get" $'User: alice\nRoles: app' ctl user get alice
expect "user list" $'alice\nroot' ctl user list
expect "auth enable" "Authentication Enabled" ctl auth enable

expect "allowed put" "OK" ctl "${ALICE[@]}" put app/y 2
expect "allowed get --prefix" $'app/x\n1\napp/y\n2' ctl "${ALICE[@]}" get app/ --prefix
expect_error "denied put" "Error: etcdserver: permission denied" ctl "${ALICE[@]}" put other 2
expect_error "denied get" "Error: etcdserver: permission denied" ctl "${ALICE[@]}" get other
expect_error "denied put on a read-only key" "Error: etcdserver: permission denied" \
    ctl "${ALICE[@]}" put ro 1
expect_error "denied delete of a range" "Error: etcdserver: permission denied" \
    ctl "${ALICE[@]}" del app --prefix
expect_error "no user" "Error: etcdserver: user name is empty" ctl get app/x
expect_error "wrong password" \
    "Error: etcdserver: authentication failed, invalid user ID or password" \
    ctl --user alice:wrong get app/x
expect_error "user list by a non-root user" "Error: etcdserver: permission denied" \
    ctl "${ALICE[@]}" user list
expect "root reads anything" $'other\n1' ctl "${ROOT[@]}" get other
expect "role revoke-permission" "Permission of key ro is revoked from role app" \
    ctl "${ROOT[@]}" role revoke-permission app ro
expect "user revoke-role" "Role app is revoked from user alice" \
    ctl "${ROOT[@]}" user revoke-role alice app
expect_error "revoked user" "Error: etcdserver: permission denied" ctl "${ALICE[@]}" get app/x
expect "auth disable" "Authentication Disabled" ctl "${ROOT[@]}" auth disable
expect "get after disable" $'app/x\n1' ctl get app/x
expect "user delete" "User alice deleted" ctl user delete alice
expect "role delete" "Role app deleted" ctl role delete app

echo "all etcdctl auth checks passed against ${ENDPOINT}"
