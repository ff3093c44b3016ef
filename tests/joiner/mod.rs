//! A member started with `--initial-cluster-state existing` on a new data dir (the cluster
//! harness starts members of a new cluster only): killed, by its PID, when dropped.

use std::process::{Child, Command, Stdio};

use crate::common::Flavor;

pub struct Joiner {
    child: Child,
    log: std::path::PathBuf,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl Joiner {
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
        let scheme = if peer_tls_args.is_empty() {
            "http"
        } else {
            "https"
        };
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

impl Drop for Joiner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
