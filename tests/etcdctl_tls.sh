#!/usr/bin/env bash
# Client certificate authentication through etcdctl and curl against the server at $1, an
# https:// endpoint started with --client-cert-auth and --trusted-ca-file $2/ca.pem. $2 holds
# the certificates tests/tls.rs generates: alice, bob, root (CN = the name), nocn (no Common
# Name), all signed by ca.pem, and mallory (CN=alice) signed by another CA. Checks each output
# against the exact string real etcd 3.4 prints. The server must be fresh.
set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 <https client endpoint> <certificate dir>" >&2
    exit 2
fi
ENDPOINT=$1
CERTS=$2
export ETCDCTL_API=3
ERR=$(mktemp)
trap 'rm -f "$ERR"' EXIT

# shellcheck source=etcdctl_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/etcdctl_lib.sh"

# as NAME ARGS...: etcdctl with NAME's client certificate.
as() {
    local who=$1
    shift
    ctl --cacert "$CERTS/ca.pem" --cert "$CERTS/$who.pem" --key "$CERTS/$who.key" "$@"
}

# gateway NAME PATH JSON: POST to the gateway with NAME's certificate; body, then HTTP status.
gateway() {
    curl --silent --show-error --max-time 10 --cacert "$CERTS/ca.pem" \
        --cert "$CERTS/$1.pem" --key "$CERTS/$1.key" -w '%{http_code}' "$ENDPOINT$2" -d "$3"
}

# The handshake fails, which etcdctl reports as a dial timeout (2 s by default).
expect_error "no client certificate" "Error: context deadline exceeded" \
    ctl --cacert "$CERTS/ca.pem" put k v
expect_error "certificate of an untrusted CA" "Error: context deadline exceeded" \
    as mallory put k v

expect "user add root" "User root created" as alice user add root --new-user-password=rootpw
expect "role add" "Role app created" as alice role add app
expect "grant" "Role app updated" as alice role grant-permission app readwrite app/ --prefix
expect "user add alice" "User alice created" as alice user add alice --new-user-password=alicepw
expect "grant-role" "Role app is granted to user alice" as alice user grant-role alice app
expect "auth enable" "Authentication Enabled" as alice auth enable

# No token: the certificate's Common Name is the user.
expect "CN alice: allowed put" "OK" as alice put app/x 1
expect "CN alice: allowed get" "1" as alice get app/x --print-value-only
expect_error "CN alice: denied put" "Error: etcdserver: permission denied" as alice put other 1
expect_error "CN alice: denied get" "Error: etcdserver: permission denied" as alice get other
expect_error "CN alice: not root" "Error: etcdserver: permission denied" as alice user list
expect "CN alice: own user" $'User: alice\nRoles: app' as alice user get alice
expect "CN root: admin" $'alice\nroot' as root user list
# A token wins over the certificate.
expect "token of root over CN alice" "OK" as alice --user root:rootpw put other 2
expect_error "bad password over CN alice" \
    "Error: etcdserver: authentication failed, invalid user ID or password" \
    as alice --user root:wrong put other 3
# A name that is no user, and no name at all, are both denied (not "user name is empty").
expect_error "CN bob (no such user)" "Error: etcdserver: permission denied" as bob put app/x 1
expect_error "no CN" "Error: etcdserver: permission denied" as nocn put app/x 1

# The gateway refuses a certificate with a Common Name while auth is on, and never takes the
# user from the certificate.
expect "gateway: named certificate refused" \
    $'CommonName of client sending a request against gateway will be ignored and not used as expected\n400' \
    gateway alice /v3/kv/put '{"key":"YXBwL3k=","value":"MQ=="}'
expect_match "gateway: no CN, no token" '"etcdserver: user name is empty".*400$' \
    gateway nocn /v3/kv/range '{"key":"YXBwL3g="}'

expect "auth disable by CN root" "Authentication Disabled" as root auth disable
expect_match "gateway: named certificate once auth is off" '"kvs".*200$' \
    gateway alice /v3/kv/range '{"key":"YXBwL3g="}'
echo "all TLS checks passed against $ENDPOINT"
