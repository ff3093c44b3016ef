//! Runs `tests/etcdctl_check.sh`: etcdctl's own `check perf --load s` (a minute of 150 puts/s
//! from 50 clients; slowest request under 500 ms) and `check datascale --load s` against the
//! server under test. Its own test binary, so that no other test loads the machine while the
//! minute of latency is measured (cargo runs test binaries one after another).

mod common;

use common::{run_etcdctl_script, Server};

const CHECK_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/etcdctl_check.sh");
/// The perf check takes 60 s, datascale about 10 s; the rest is slack for a slow machine.
const CHECK_TIMEOUT_S: u32 = 240;

#[tokio::test]
async fn etcdctl_check_perf_and_datascale_pass() {
    run_etcdctl_script(&Server::subject(&[]).await, CHECK_SCRIPT, CHECK_TIMEOUT_S);
}
