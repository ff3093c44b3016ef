//! TLS on the client port, each check run against real etcd 3.4 and the server under test
//! with the same flags and certificates (generated here with the `openssl` CLI): etcd-client,
//! etcdctl and curl over https, gRPC and HTTP/1.1 on one port, a plain-text client on a TLS
//! port, `--client-cert-auth` with Common Name authentication (`tests/etcdctl_tls.sh`), and
//! `--auto-tls`.

mod common;
mod joiner;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::cluster::{eventually, Cluster};
use common::{ClientTls, Flavor, Server};
use etcd_client::{Certificate, Identity, TlsOptions};
use joiner::Joiner;
use tempfile::TempDir;

/// Bound on one etcdctl or curl run; a hang fails the test instead.
const COMMAND_TIMEOUT_S: u32 = 60;
/// How long a plain-text client on a TLS port may wait for the server to end the exchange.
const PLAINTEXT_READ_TIMEOUT_MS: u64 = 5_000;

const TLS_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/etcdctl_tls.sh");

/// A CA, a server certificate for 127.0.0.1, and client certificates: `alice`, `bob` and
/// `root` (Common Name = the name), `nocn` (no Common Name), all signed by the CA, and
/// `mallory` (CN=alice) signed by another CA.
struct Certs {
    dir: TempDir,
}

impl Certs {
    fn generate() -> Certs {
        let certs = Certs {
            dir: tempfile::Builder::new()
                .prefix("ferrocd-tls-")
                .tempdir()
                .expect("create temp dir"),
        };
        certs.self_signed_ca("ca");
        certs.self_signed_ca("rogue-ca");
        let server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
                          extendedKeyUsage=serverAuth,clientAuth\n";
        certs.leaf("server", "/CN=server", "ca", server_ext);
        let client_ext = "extendedKeyUsage=clientAuth\n";
        for (name, subject) in [
            ("alice", "/O=test/CN=alice"),
            ("bob", "/CN=bob"),
            ("root", "/CN=root"),
            ("nocn", "/O=nobody"),
        ] {
            certs.leaf(name, subject, "ca", client_ext);
        }
        certs.leaf("mallory", "/CN=alice", "rogue-ca", client_ext);
        certs
    }

    fn path(&self, file: &str) -> String {
        let path: PathBuf = self.dir.path().join(file);
        path.to_str().expect("temp paths are UTF-8").to_string()
    }

    fn openssl(&self, args: &[&str]) {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .expect("run openssl");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn self_signed_ca(&self, name: &str) {
        let (key, pem, subject) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN={name}"),
        );
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subject,
        ]);
    }

    fn leaf(&self, name: &str, subject: &str, ca: &str, extensions: &str) {
        let ext_file = format!("{name}.ext");
        std::fs::write(self.dir.path().join(&ext_file), extensions).expect("write extensions");
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ]);
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext_file,
        ]);
    }

    fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(file)).expect("read certificate")
    }

    /// etcd-client settings trusting the CA, with `client`'s certificate if given.
    fn client_tls(&self, client: Option<&str>) -> TlsOptions {
        let tls = TlsOptions::new().ca_certificate(Certificate::from_pem(self.read("ca.pem")));
        match client {
            Some(name) => tls.identity(Identity::from_pem(
                self.read(&format!("{name}.pem")),
                self.read(&format!("{name}.key")),
            )),
            None => tls,
        }
    }

    /// Server flags: the server certificate, plus `extra`.
    fn server_args(&self, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            "--cert-file".to_string(),
            self.path("server.pem"),
            "--key-file".to_string(),
            self.path("server.key"),
        ];
        args.extend(extra.iter().map(|arg| arg.to_string()));
        args
    }
}

/// Both servers: real etcd, then the server under test.
fn flavors() -> [Flavor; 2] {
    [Flavor::Etcd, Flavor::subject(&[])]
}

fn run(program: &str, args: &[String]) -> Output {
    Command::new("timeout")
        .arg(COMMAND_TIMEOUT_S.to_string())
        .arg(program)
        .args(args)
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn etcdctl(server: &Server, tls: &[String], args: &[&str]) -> Output {
    let mut all = vec![format!("--endpoints={}", server.endpoint())];
    all.extend(tls.iter().cloned());
    all.extend(args.iter().map(|arg| arg.to_string()));
    run("etcdctl", &all)
}

/// curl of `path` on the server: the body, a space, the HTTP version used.
fn curl(server: &Server, certs: &Certs, extra: &[&str], path: &str) -> String {
    let args = [&["-w", " %{http_version}"], extra].concat();
    curl_url(certs, &args, &format!("{}{path}", server.endpoint()))
}

/// Sends a plain HTTP request to a TLS port: the server must end the exchange (close or TLS
/// alert) within the bound, and never answer in HTTP.
fn plaintext_request_is_refused(server: &Server) {
    let addr = server.endpoint().trim_start_matches("https://").to_string();
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(PLAINTEXT_READ_TIMEOUT_MS)))
        .expect("set read timeout");
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    // The server may close before the write completes; either way it must not answer.
    let _ = stream.write_all(request.as_bytes());
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{:?}: plain-text client not refused: {e}", server.flavor()),
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("health"),
        "{:?} answered: {answer}",
        server.flavor()
    );
}

#[tokio::test]
async fn grpc_and_http_share_a_tls_port() {
    let certs = Certs::generate();
    for flavor in flavors() {
        let tls = ClientTls {
            server_args: certs.server_args(&[]),
            client: Some(certs.client_tls(None)),
        };
        let server = Server::with_tls(flavor, tls).await;
        let mut client = server.client().await;
        client
            .put("tls-key", "over-grpc", None)
            .await
            .expect("put over TLS");
        let got = client.get("tls-key", None).await.expect("get over TLS");
        assert_eq!(got.kvs()[0].value(), b"over-grpc");

        let ca = ["--cacert".to_string(), certs.path("ca.pem")];
        let put = etcdctl(&server, &ca, &["put", "ctl-key", "v1"]);
        assert_eq!(stdout(&put).trim(), "OK", "{put:?}");
        let get = etcdctl(&server, &ca, &["get", "ctl-key", "--print-value-only"]);
        assert_eq!(stdout(&get).trim(), "v1", "{get:?}");

        // ALPN: curl picks h2 when offered, HTTP/1.1 when told to.
        let health = curl(&server, &certs, &["--http2"], "/health");
        assert!(health.starts_with(r#"{"health":"true""#), "{health}");
        assert!(health.ends_with(" 2"), "{health}");
        let range = r#"{"key":"dGxzLWtleQ=="}"#; // tls-key
        let body = curl(&server, &certs, &["--http1.1", "-d", range], "/v3/kv/range");
        assert!(body.contains(r#""value":"b3Zlci1ncnBj""#), "{body}"); // over-grpc
        assert!(body.ends_with(" 1.1"), "{body}");

        plaintext_request_is_refused(&server);
        // The server still serves TLS clients afterwards.
        client
            .get("tls-key", None)
            .await
            .expect("get after the plain-text client");
    }
}

/// Peer TLS: 3 members with `https://` peer URLs that verify each other's certificates
/// against the CA (both ways, `--peer-client-cert-auth`) elect a leader, replicate a write
/// made through a follower, and converge; real etcd first, with the same flags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_peer_tls_replicates() {
    let certs = Certs::generate();
    let peer_args = peer_tls_args(&certs);
    for flavor in flavors() {
        let mut cluster = Cluster::start_with_peer_tls(flavor, 3, &peer_args).await;
        let follower = (cluster.leader().await + 1) % cluster.size();
        let mut client = cluster.client(follower).await;
        client
            .put("over-peer-tls", "v", None)
            .await
            .expect("put through a follower");
        cluster.assert_converged(follower).await;
        cluster.stop();
    }
}

/// The `--peer-*` flags of members that verify each other's certificates against the CA,
/// both ways.
fn peer_tls_args(certs: &Certs) -> Vec<String> {
    [
        "--peer-cert-file",
        &certs.path("server.pem"),
        "--peer-key-file",
        &certs.path("server.key"),
        "--peer-trusted-ca-file",
        &certs.path("ca.pem"),
        "--peer-client-cert-auth",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect()
}

/// Bound on a joining member catching up (its promotion is refused until then), and on the
/// leader taking a MemberAdd (etcd wants every voter connected for a while first).
const JOIN_TIMEOUT_MS: u64 = 20_000;
const JOIN_POLL_MS: u64 = 50;

/// Peer TLS: a fourth member joins a cluster of 3 over `https://` peer URLs (certificates
/// verified both ways): it asks the members for the membership over TLS with its peer
/// certificate, catches up as a learner, is promoted, and serves a write; real etcd first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_a_cluster_over_peer_tls() {
    const MEMBERS: usize = 3;
    let certs = Certs::generate();
    let peer_args = peer_tls_args(&certs);
    for flavor in flavors() {
        let cluster = Cluster::start_with_peer_tls(flavor.clone(), MEMBERS, &peer_args).await;
        let client = cluster.client(cluster.leader().await).await;
        let (joiner, id) =
            Joiner::add_learner(&cluster, &client, &peer_args, JOIN_TIMEOUT_MS, JOIN_POLL_MS).await;
        let promoted = eventually("promotion", JOIN_TIMEOUT_MS, JOIN_POLL_MS, || {
            let mut client = client.clone();
            async move { client.member_promote(id).await.ok() }
        })
        .await;
        assert!(
            promoted.members().iter().all(|m| !m.is_learner()),
            "{flavor:?}: joiner log:\n{}",
            joiner.log()
        );
        let mut through_joiner = etcd_client::Client::connect([joiner.endpoint.clone()], None)
            .await
            .expect("client of the joined member");
        // Served once the joiner has applied its promotion too.
        eventually(
            "a put through the joiner",
            JOIN_TIMEOUT_MS,
            JOIN_POLL_MS,
            || {
                let mut client = through_joiner.clone();
                async move { client.put("joined-over-tls", "v", None).await.ok() }
            },
        )
        .await;
        let list = through_joiner.member_list().await.expect("member list");
        assert_eq!(list.members().len(), MEMBERS + 1);
    }
}

#[tokio::test]
async fn client_cert_auth_needs_a_certificate_of_the_trusted_ca() {
    let certs = Certs::generate();
    for flavor in flavors() {
        let server_args = certs.server_args(&[
            "--client-cert-auth",
            "--trusted-ca-file",
            &certs.path("ca.pem"),
        ]);
        let tls = ClientTls {
            server_args,
            client: Some(certs.client_tls(Some("alice"))),
        };
        let server = Server::with_tls(flavor, tls).await;
        server
            .client()
            .await
            .put("k", "v", None)
            .await
            .expect("put with a trusted cert");

        let ca = ["--cacert".to_string(), certs.path("ca.pem")];
        let as_mallory = [
            ca.to_vec(),
            vec![
                "--cert".to_string(),
                certs.path("mallory.pem"),
                "--key".to_string(),
                certs.path("mallory.key"),
            ],
        ]
        .concat();
        for (who, tls) in [
            ("no certificate", &ca[..]),
            ("another CA's", &as_mallory[..]),
        ] {
            let output = etcdctl(&server, tls, &["--dial-timeout=1s", "get", "k"]);
            assert!(
                !output.status.success(),
                "{:?}: {who} accepted",
                server.flavor()
            );
        }
        let no_cert = run(
            "curl",
            &[
                "--silent".into(),
                "--cacert".into(),
                certs.path("ca.pem"),
                format!("{}/health", server.endpoint()),
            ],
        );
        assert!(
            !no_cert.status.success(),
            "{:?}: curl without a certificate",
            server.flavor()
        );
    }
}

#[tokio::test]
async fn common_name_authentication_matches_etcd() {
    let certs = Certs::generate();
    for flavor in flavors() {
        let server_args = certs.server_args(&[
            "--client-cert-auth",
            "--trusted-ca-file",
            &certs.path("ca.pem"),
        ]);
        let tls = ClientTls {
            server_args,
            client: Some(certs.client_tls(Some("alice"))),
        };
        let server = Server::with_tls(flavor, tls).await;
        let output = run(
            "bash",
            &[TLS_SCRIPT.to_string(), server.endpoint(), certs.path("")],
        );
        println!("{}", stdout(&output));
        assert!(
            output.status.success() && stdout(&output).contains("all TLS checks passed"),
            "{:?}:\n{}\n{}",
            server.flavor(),
            stdout(&output),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test]
async fn auto_tls_generates_a_certificate_under_the_data_dir() {
    for flavor in flavors() {
        let tls = ClientTls {
            server_args: vec!["--auto-tls".to_string()],
            client: None,
        };
        let server = Server::with_tls(flavor, tls).await;
        let insecure = [
            "--insecure-transport=false".to_string(),
            "--insecure-skip-tls-verify".to_string(),
        ];
        let put = etcdctl(&server, &insecure, &["put", "auto", "tls"]);
        assert_eq!(stdout(&put).trim(), "OK", "{:?}: {put:?}", server.flavor());
        let get = etcdctl(&server, &insecure, &["get", "auto", "--print-value-only"]);
        assert_eq!(stdout(&get).trim(), "tls", "{:?}: {get:?}", server.flavor());
        let fixtures = server.data_dir().join("fixtures").join("client");
        for file in ["cert.pem", "key.pem"] {
            assert!(
                Path::new(&fixtures.join(file)).is_file(),
                "{:?}: no {file} in {}",
                server.flavor(),
                fixtures.display()
            );
        }
    }
}

/// Exit 1 with etcd's message when the TLS flags cannot work.
#[test]
fn tls_flag_errors_read_as_etcds() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("d");
    let start = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_ferrocd"))
            .args(["--data-dir", data_dir.to_str().unwrap()])
            .args(["--listen-client-urls", "https://127.0.0.1:0"])
            .args(args)
            .output()
            .expect("run ferrocd");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let server_pem = certs.path("server.pem");
    let (code, message) = start(&["--cert-file", &server_pem]);
    assert_eq!(code, Some(1), "{message}");
    let expected = format!("KeyFile and CertFile must both be present[key: , cert: {server_pem}]");
    assert!(message.contains(&expected), "{message}");

    let missing = certs.path("missing.pem");
    let (code, message) = start(&[
        "--cert-file",
        &missing,
        "--key-file",
        &certs.path("server.key"),
    ]);
    assert_eq!(code, Some(1), "{message}");
    assert!(message.contains(&format!("open {missing}: ")), "{message}");

    let (code, message) = start(&[]);
    assert_eq!(code, Some(1), "{message}");
    assert!(
        message.contains("TLS key/cert (--cert-file, --key-file) must be provided for client url https://127.0.0.1:0 with HTTPS scheme"),
        "{message}"
    );

    // Peer flags are checked at start too.
    let (code, message) = start(&[
        "--cert-file",
        &server_pem,
        "--key-file",
        &certs.path("server.key"),
        "--peer-key-file",
        &certs.path("server.key"),
    ]);
    assert_eq!(code, Some(1), "{message}");
    assert!(
        message.contains("KeyFile and CertFile must both be present"),
        "{message}"
    );
}

/// Kills a server process when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `http://` and `https://` client URLs side by side, as etcd allows: each port speaks its own
/// scheme only. (The harness serves one client URL, so this test starts the servers itself.)
#[test]
fn mixed_http_and_https_listen_urls() {
    let certs = Certs::generate();
    for program in ["etcd", env!("CARGO_BIN_EXE_ferrocd")] {
        let dir = tempfile::tempdir().expect("temp dir");
        let listeners: Vec<_> = (0..3)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("local addr").port())
            .collect();
        drop(listeners);
        let (https, http) = (
            format!("https://127.0.0.1:{}", ports[0]),
            format!("http://127.0.0.1:{}", ports[1]),
        );
        let peer = format!("http://127.0.0.1:{}", ports[2]);
        let child = Command::new(program)
            .args(["--data-dir", dir.path().join("d").to_str().unwrap()])
            .args(["--listen-client-urls", &format!("{https},{http}")])
            .args(["--advertise-client-urls", &https])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("default={peer}")])
            .args(certs.server_args(&[]))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
        let _server = KillOnDrop(child);
        // curl retries until the server listens (bounded: 20 tries, 20 s).
        let wait = ["--retry", "20", "--retry-delay", "1", "--retry-connrefused"];
        let secure = curl_url(&certs, &wait, &format!("{https}/health"));
        assert!(
            secure.starts_with(r#"{"health":"true""#),
            "{program}: {secure}"
        );
        let plain = curl_url(&certs, &[], &format!("{http}/health"));
        assert!(
            plain.starts_with(r#"{"health":"true""#),
            "{program}: {plain}"
        );
        let wrong_scheme = run(
            "curl",
            &[
                "--silent".into(),
                "--max-time".into(),
                "5".into(),
                format!("http://127.0.0.1:{}/health", ports[0]),
            ],
        );
        assert!(
            !stdout(&wrong_scheme).contains("health"),
            "{program}: {wrong_scheme:?}"
        );
    }
}

/// curl of a full URL trusting the test CA; must succeed. Returns what it prints.
fn curl_url(certs: &Certs, extra: &[&str], url: &str) -> String {
    let mut args = vec!["--silent".to_string(), "--show-error".to_string()];
    args.extend(["--cacert".to_string(), certs.path("ca.pem")]);
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args.push(url.to_string());
    let output = run("curl", &args);
    assert!(
        output.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

/// Sends a gRPC KV Put over raw HTTP/1.1 (which ferrocd's router accepts) with `headers`; the
/// connection closes after the answer.
fn raw_grpc_put(server: &Server, key: &str, headers: &[(&str, &str)]) {
    use prost::Message;
    let request = ferrocd_api::etcdserverpb::PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        ..Default::default()
    };
    let message = request.encode_to_vec();
    let mut body = vec![0u8]; // not compressed
    body.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend(message);
    let addr = server.endpoint().trim_start_matches("http://").to_string();
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_millis(PLAINTEXT_READ_TIMEOUT_MS)))
        .expect("set read timeout");
    let mut head = format!(
        "POST /etcdserverpb.KV/Put HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/grpc\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("write head");
    stream.write_all(&body).expect("write body");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("read the answer");
}

/// The header that carries a verified certificate's Common Name to auth is the connection's
/// alone: a client that sends it itself is not that user. (ferrocd only: etcd has no such
/// header and refuses gRPC over HTTP/1.1, so the control below could not pass there.)
#[tokio::test]
async fn a_client_cannot_claim_a_common_name_by_header() {
    let server = Server::ferrocd(&[]).await;
    let mut admin = server.client().await;
    admin
        .user_add("root", "rootpw", None)
        .await
        .expect("user add");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("grant root");
    admin.auth_enable().await.expect("auth enable");
    let token = admin
        .auth_client()
        .authenticate("root".into(), "rootpw".into())
        .await
        .expect("authenticate")
        .token()
        .to_string();

    // Control: the raw request path works when the caller is root by token.
    raw_grpc_put(&server, "with-token", &[("token", &token)]);
    let spoofed = "ferrocd-internal-tls-common-name";
    raw_grpc_put(&server, "with-spoofed-name", &[(spoofed, "root")]);

    let options = etcd_client::ConnectOptions::new().with_user("root", "rootpw");
    let mut root = etcd_client::Client::connect([server.endpoint()], Some(options))
        .await
        .expect("connect as root");
    let written = |key: &'static str| {
        let mut root = root.clone();
        async move { root.get(key, None).await.expect("get").count() == 1 }
    };
    assert!(written("with-token").await, "the raw gRPC put did not work");
    assert!(
        !written("with-spoofed-name").await,
        "a client-sent name was trusted"
    );
    root.auth_disable().await.expect("auth disable");
}
