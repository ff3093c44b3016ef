//! A member started with `--initial-cluster-state existing` on a new data dir (the cluster
//! harness starts members of a new cluster only): killed, by its PID, when dropped.

use std::process::{Child, Command, Stdio};

use etcd_client::{Client, MemberAddOptions};

use crate::common::cluster::{eventually, member_name, Cluster};
use crate::common::{pick_free_ports, Flavor};

pub struct Joiner {
    child: Child,
    log: std::path::PathBuf,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Joiner {
    /// Adds a learner through `client` (retried for `timeout_ms`: a cluster refuses changes
    /// until every member is started and connected) and starts it as the cluster's next
    /// member, its peer URL `https://` with `peer_tls_args`; returns it and its member id.
    pub async fn add_learner(
        cluster: &Cluster,
        client: &Client,
        peer_tls_args: &[String],
        timeout_ms: u64,
        poll_ms: u64,
    ) -> (Joiner, u64) {
        let ports = pick_free_ports(2);
        let scheme = peer_scheme(peer_tls_args);
        let peer_url = format!("{scheme}://127.0.0.1:{}", ports[1]);
        let learner = MemberAddOptions::new().with_is_learner();
        let added = eventually("member add --learner", timeout_ms, poll_ms, || {
            let (mut client, url, options) = (client.clone(), peer_url.clone(), learner.clone());
            async move { client.member_add([url], Some(options)).await.ok() }
        })
        .await;
        let id = added.member().expect("the added member").id();
        let name = member_name(cluster.size());
        let mut initial_cluster: Vec<String> = (0..cluster.size())
            .map(|i| format!("{}={}", member_name(i), cluster.member(i).peer_url()))
            .collect();
        initial_cluster.push(format!("{name}={peer_url}"));
        let joiner = Joiner::start(
            cluster.flavor(),
            &name,
            &initial_cluster.join(","),
            [ports[0], ports[1]],
            peer_tls_args,
        );
        (joiner, id)
    }

    /// Starts `name` listening on `ports` (client, peer); with `peer_tls_args` (the `--peer-*`
    /// flags) its peer URL is `https://`.
    pub fn start(
        flavor: &Flavor,
        name: &str,
        initial_cluster: &str,
        ports: [u16; 2],
        peer_tls_args: &[String],
    ) -> Joiner {
        let dir = tempfile::tempdir().expect("temp dir");
        let scheme = peer_scheme(peer_tls_args);
        let (client, peer) = (
            format!("http://127.0.0.1:{}", ports[0]),
            format!("{scheme}://127.0.0.1:{}", ports[1]),
        );
        let log = dir.path().join("joiner.log");
        let log_file = std::fs::File::create(&log).expect("joiner log");
        let (program, extra) = match flavor {
            Flavor::Etcd => ("etcd", Vec::new()),
            Flavor::Ferrocd(args) => (env!("CARGO_BIN_EXE_ferrocd"), args.clone()),
        };
        let data_dir = dir.path().join("data");
        let child = Command::new(program)
            .args(["--name", name, "--data-dir"])
            .arg(&data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", initial_cluster])
            .args(["--initial-cluster-state", "existing"])
            .args(peer_tls_args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start the joining member");
        Joiner {
            child,
            log,
            endpoint: client,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A member's peer URL scheme: `https` when it has the `--peer-*` TLS flags.
fn peer_scheme(peer_tls_args: &[String]) -> &'static str {
    match peer_tls_args.is_empty() {
        true => "http",
        false => "https",
    }
}

impl Drop for Joiner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
