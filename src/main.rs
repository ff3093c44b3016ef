//! `ferrocd`: an etcd v3 compatible server. Flags and defaults follow etcd's.

use clap::Parser;
use ferrocd_net::auth::jwt::{JwtOptions, DEFAULT_JWT_TTL};
use ferrocd_net::lease::LeaseConfig;
use ferrocd_net::log;
use ferrocd_net::members::{parse_initial_cluster, ClusterState};
use ferrocd_net::node::checkpoint::{
    CheckpointConfig, DEFAULT_CHECKPOINT_INTERVAL_MS, DEFAULT_CHECKPOINT_MAX_CHANGES,
};
use ferrocd_net::node::compactor::{AutoCompaction, REVISION_MODE_INTERVAL_MS};
use ferrocd_net::node::recovery::Bootstrap;
use ferrocd_net::node::replica::{RaftTiming, DEFAULT_SNAPSHOT_CATCHUP_ENTRIES};
use ferrocd_net::node::restore::{self, RestoreConfig};
use ferrocd_net::node::space::DEFAULT_QUOTA_BYTES;
use ferrocd_net::node::Limits;
use ferrocd_net::server::{self, NodeConfig, Shutdown};
use ferrocd_net::tls::{ListenUrl, TlsFiles};
use ferrocd_net::watch::journal::JournalLimits;
use ferrocd_net::{error, info, warn};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "ferrocd",
    version,
    about = "A drop-in etcd v3 server, shard-per-core"
)]
struct Flags {
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    name: String,
    /// Path to the data directory (default: <name>.ferrocd).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Comma-separated URLs to listen on for client traffic.
    #[arg(long, default_value = "http://localhost:2379")]
    listen_client_urls: String,
    /// Comma-separated client URLs advertised to the cluster.
    #[arg(long, default_value = "http://localhost:2379")]
    advertise_client_urls: String,
    /// Comma-separated URLs to listen on for peer traffic.
    #[arg(long, default_value = "http://localhost:2380")]
    listen_peer_urls: String,
    /// Comma-separated peer URLs advertised to the cluster.
    #[arg(long, default_value = "http://localhost:2380")]
    initial_advertise_peer_urls: String,
    /// Initial cluster configuration for bootstrapping (name=peer-url,...).
    #[arg(long, default_value = "default=http://localhost:2380")]
    initial_cluster: String,
    /// Initial cluster state: new or existing.
    #[arg(long, default_value = "new", value_parser = ["new", "existing"])]
    initial_cluster_state: String,
    /// Initial cluster token for the cluster during bootstrap.
    #[arg(long, default_value = "etcd-cluster")]
    initial_cluster_token: String,
    /// Backend size limit in bytes before the NOSPACE alarm (0 = default 2 GiB).
    #[arg(long, default_value_t = 0)]
    quota_backend_bytes: i64,
    /// Maximum client request size in bytes the server will accept.
    #[arg(long, default_value_t = 1536 * 1024)]
    max_request_bytes: usize,
    /// Maximum number of operations permitted in a transaction.
    #[arg(long, default_value_t = 128)]
    max_txn_ops: usize,
    /// Number of committed transactions to trigger a snapshot to disk.
    #[arg(long, default_value_t = 100_000)]
    snapshot_count: u64,
    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, default_value_t = 100)]
    heartbeat_interval: u64,
    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, default_value_t = 1000)]
    election_timeout: u64,
    /// Interpret auto-compaction-retention as 'periodic' or 'revision'.
    #[arg(long, default_value = "periodic", value_parser = ["periodic", "revision"])]
    auto_compaction_mode: String,
    /// Auto compaction retention (0 = off).
    #[arg(long, default_value = "0")]
    auto_compaction_retention: String,
    /// Interval of revision-mode auto compaction (etcd: 5 minutes); small values for tests.
    #[arg(long, default_value_t = REVISION_MODE_INTERVAL_MS, hide = true)]
    experimental_auto_compaction_interval_ms: u64,
    /// Log level: debug, info, warn, error, panic, fatal.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log format: json (etcd's zap lines) or console.
    #[arg(long, default_value = "json")]
    log_format: String,
    /// Where logs go: default (stderr), stderr or stdout.
    #[arg(long, default_value = "default")]
    log_outputs: String,
    /// etcd 3.4's logger choice, accepted so its command lines run: ferrocd always logs through
    /// its zap-shaped logger (`--log-format` picks JSON or console lines).
    #[arg(long, default_value = "zap", value_parser = ["zap", "capnslog"])]
    logger: String,
    /// Duration of periodic watch progress notifications (Go duration, e.g. 10m, 100ms).
    #[arg(long, default_value = "10m", hide = true)]
    experimental_watch_progress_notify_interval: String,
    /// Number of shards the keyspace is split into (fixed when the data dir is created).
    #[arg(long)]
    shards: Option<usize>,
    /// How often remaining lease TTLs are checkpointed (etcd: 5 minutes); for tests.
    #[arg(long, default_value_t = 5 * 60 * 1000, hide = true)]
    lease_checkpoint_interval_ms: u64,
    /// Entries a cluster member keeps in the meta log below each compaction point, so a
    /// slow member catches up from the log (etcd 3.5's flag of this name; default 5000).
    #[arg(long, default_value_t = DEFAULT_SNAPSHOT_CATCHUP_ENTRIES, hide = true)]
    experimental_snapshot_catchup_entries: u64,
    /// Size every WAL segment is preallocated to (etcd: 64 MB); small values for tests.
    #[arg(long, default_value_t = 64 * 1024 * 1024, hide = true)]
    experimental_wal_segment_size_bytes: u64,
    /// Write WAL segments with O_DIRECT (default: buffered writes, each batch fdatasync'd).
    #[arg(long, hide = true)]
    experimental_wal_direct_io: bool,
    /// Longest time applied changes wait before they are checkpointed (etcd: 100 ms).
    #[arg(long, default_value_t = DEFAULT_CHECKPOINT_INTERVAL_MS, hide = true)]
    experimental_checkpoint_interval_ms: u64,
    /// Number of waiting changes that starts a checkpoint at once (etcd: 10,000).
    #[arg(long, default_value_t = DEFAULT_CHECKPOINT_MAX_CHANGES, hide = true)]
    experimental_checkpoint_max_changes: usize,
    /// Auth token type: `simple`, or
    /// `jwt,pub-key=<pem>,priv-key=<pem>,sign-method=<RS256|PS256|ES256|...>,ttl=<duration>`.
    #[arg(long, default_value = "simple")]
    auth_token: String,
    /// Seconds a simple auth token lives after its last use (etcd's `--auth-token-ttl`).
    #[arg(long, default_value_t = ferrocd_net::auth::DEFAULT_TOKEN_TTL_S)]
    auth_token_ttl: u64,
    /// Revisions each shard's watch event journal holds; for tests (a tiny journal makes the
    /// watch hubs fall behind and read from storage).
    #[arg(long, default_value_t = JournalLimits::default().max_revisions, hide = true)]
    watch_journal_max_revisions: usize,
    /// Test-only disk fault (docs/RELIABILITY.md): `fsync-error` makes every fdatasync fail
    /// with EIO from the moment the process receives SIGUSR2.
    #[arg(long, hide = true)]
    experimental_fault_injection: Option<ferrocd_engine::fault::Fault>,
    #[command(flatten)]
    tls: TlsFlags,
}

/// etcd's TLS flags. The client ones secure the `https://` client URLs, the peer ones the
/// `https://` peer URLs (net/src/tls.rs `PeerTls`).
#[derive(clap::Args, Debug)]
struct TlsFlags {
    /// Path to the client server TLS certificate file (PEM).
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// Path to the client server TLS key file (PEM).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Path to the client server TLS trusted CA file: client certificates must be signed by it.
    #[arg(long)]
    trusted_ca_file: Option<PathBuf>,
    /// Enable client cert authentication: a verified certificate's Common Name is the user
    /// of a request without a token.
    #[arg(long)]
    client_cert_auth: bool,
    /// Client TLS using a generated certificate (under <data-dir>/fixtures/client).
    #[arg(long)]
    auto_tls: bool,
    /// Path to the peer server TLS certificate file (PEM); also the client certificate this
    /// member presents to its peers.
    #[arg(long)]
    peer_cert_file: Option<PathBuf>,
    /// Path to the peer server TLS key file (PEM).
    #[arg(long)]
    peer_key_file: Option<PathBuf>,
    /// Path to the peer server TLS trusted CA file: peers' certificates must be signed by it
    /// (both ways); without it peer certificates are not verified.
    #[arg(long)]
    peer_trusted_ca_file: Option<PathBuf>,
    /// Enable peer client cert authentication (needs --peer-trusted-ca-file, which already
    /// requires and verifies peers' certificates).
    #[arg(long)]
    peer_client_cert_auth: bool,
    /// Peer TLS using a generated certificate (under <data-dir>/fixtures/peer).
    #[arg(long)]
    peer_auto_tls: bool,
}

impl TlsFlags {
    fn client(&self) -> TlsFiles {
        TlsFiles {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            trusted_ca_file: self.trusted_ca_file.clone(),
            client_cert_auth: self.client_cert_auth,
            auto_tls: self.auto_tls,
        }
    }

    fn peer(&self) -> TlsFiles {
        TlsFiles {
            cert_file: self.peer_cert_file.clone(),
            key_file: self.peer_key_file.clone(),
            trusted_ca_file: self.peer_trusted_ca_file.clone(),
            client_cert_auth: self.peer_client_cert_auth,
            auto_tls: self.peer_auto_tls,
        }
    }
}

/// Resolves comma-separated `http(s)://host:port` URLs.
fn parse_urls(flag: &str, urls: &str) -> Result<Vec<ListenUrl>, String> {
    split_urls(urls)
        .iter()
        .map(|url| ListenUrl::parse(url).map_err(|e| format!("--{flag}: {e}")))
        .collect()
}

/// etcd's retention is a number with an optional unit (`0`, `1h`, `30m`); zero turns it off.
/// etcd's reading of `--auto-compaction-retention`: `0` (any unit) is off; in `revision` mode
/// a count of revisions; in `periodic` mode a bare number of hours or a Go duration.
fn auto_compaction(flags: &Flags) -> Result<Option<AutoCompaction>, String> {
    const FLAG: &str = "auto-compaction-retention";
    let retention = flags.auto_compaction_retention.trim();
    let number = retention.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    if number.parse::<f64>().is_ok_and(|v| v == 0.0) {
        return Ok(None);
    }
    if flags.auto_compaction_mode == "revision" {
        return match retention.parse::<i64>() {
            Ok(keep) if keep > 0 => Ok(Some(AutoCompaction::Revisions {
                keep,
                interval_ms: flags.experimental_auto_compaction_interval_ms,
            })),
            _ => Err(format!(
                "--{FLAG} {retention}: expected a number of revisions in revision mode"
            )),
        };
    }
    let retention_ms = match retention.parse::<u64>() {
        Ok(hours) => hours * 3600 * 1000,
        Err(_) => parse_duration_ms(FLAG, retention)?,
    };
    Ok(Some(AutoCompaction::Period {
        retention: Duration::from_millis(retention_ms),
    }))
}

/// etcd's `--auth-token`: `simple`, or `jwt` and comma-separated `key=value` options
/// (`sign-method` required, `pub-key` and/or `priv-key`, `ttl` default 5m). Unknown options are
/// logged and ignored, as etcd does.
fn jwt_options(flag: &str) -> Result<Option<JwtOptions>, String> {
    const FLAG: &str = "auth-token";
    let mut parts = flag.split(',');
    match parts.next() {
        Some("simple") if flag == "simple" => return Ok(None),
        Some("jwt") => {}
        _ => return Err(format!("--{FLAG} {flag}: expected simple or jwt,<options>")),
    }
    let mut options = JwtOptions {
        sign_method: String::new(),
        pub_key: None,
        priv_key: None,
        ttl: DEFAULT_JWT_TTL,
    };
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("--{FLAG}: option {part:?} is not key=value"))?;
        match key {
            "sign-method" => options.sign_method = value.to_string(),
            "pub-key" => options.pub_key = Some(PathBuf::from(value)),
            "priv-key" => options.priv_key = Some(PathBuf::from(value)),
            "ttl" => options.ttl = Duration::from_millis(parse_duration_ms(FLAG, value)?),
            _ => warn!("unknown JWT option ignored", key = key),
        }
    }
    if options.sign_method.is_empty() {
        return Err(format!("--{FLAG}: jwt needs sign-method"));
    }
    Ok(Some(options))
}

/// A positive Go duration (`10m`, `1.5s`, `1h30m`, `100ms`) in whole milliseconds.
fn parse_duration_ms(flag: &str, text: &str) -> Result<u64, String> {
    const UNITS_MS: [(&str, f64); 6] = [
        ("ns", 1e-6),
        ("us", 1e-3),
        ("ms", 1.0),
        ("s", 1e3),
        ("m", 60e3),
        ("h", 3600e3),
    ];
    let invalid = || format!("--{flag} {text}: expected a duration like 10m or 100ms");
    let mut rest = text.trim();
    let mut total_ms = 0.0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (_, scale) = UNITS_MS
            .iter()
            .find(|(unit, _)| *unit == &rest[..unit_len])
            .ok_or_else(invalid)?;
        total_ms += number * scale;
        rest = &rest[unit_len..];
    }
    match total_ms.round() as u64 {
        0 => Err(invalid()),
        ms => Ok(ms),
    }
}

fn split_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

fn config(flags: &Flags) -> Result<NodeConfig, String> {
    // etcd reads the list (and refuses a bad URL) whether or not the data dir exists; the
    // other checks apply only to a new data dir (`recovery::Bootstrap::verify`).
    let initial_cluster = parse_initial_cluster(&flags.initial_cluster)?;
    let auto_compaction = auto_compaction(flags)?;
    if flags.max_txn_ops == 0 || flags.max_request_bytes == 0 {
        return Err("--max-txn-ops and --max-request-bytes must be positive".into());
    }
    if flags.watch_journal_max_revisions == 0 {
        return Err("--watch-journal-max-revisions must be positive".into());
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = flags.shards.unwrap_or(cpus);
    if shards == 0 || shards > 256 {
        return Err(format!("--shards {shards}: must be between 1 and 256"));
    }
    if flags.experimental_snapshot_catchup_entries == 0 {
        return Err("--experimental-snapshot-catchup-entries must be positive".into());
    }
    // Every record must fit a segment (a larger one would be a fatal WAL error): a write's
    // record is smaller than twice its request, plus framing.
    let min_segment_bytes = 2 * flags.max_request_bytes as u64 + 64 * 1024;
    if flags.experimental_wal_segment_size_bytes < min_segment_bytes {
        return Err(format!(
            "--experimental-wal-segment-size-bytes must be at least {min_segment_bytes} \
             (twice --max-request-bytes plus 64 KiB)"
        ));
    }
    Ok(NodeConfig {
        name: flags.name.clone(),
        data_dir: flags
            .data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.ferrocd", flags.name))),
        shards,
        cores: shards.min(cpus),
        listen_client: parse_urls("listen-client-urls", &flags.listen_client_urls)?,
        listen_peer: parse_urls("listen-peer-urls", &flags.listen_peer_urls)?,
        client_tls: flags.tls.client(),
        peer_tls: flags.tls.peer(),
        advertise_client_urls: split_urls(&flags.advertise_client_urls),
        advertise_peer_urls: split_urls(&flags.initial_advertise_peer_urls),
        initial_cluster,
        initial_cluster_state: match flags.initial_cluster_state.as_str() {
            "existing" => ClusterState::Existing,
            _ => ClusterState::New,
        },
        initial_cluster_token: flags.initial_cluster_token.clone(),
        raft_timing: RaftTiming::from_etcd_flags(flags.heartbeat_interval, flags.election_timeout),
        snapshot_catchup_entries: flags.experimental_snapshot_catchup_entries,
        watch_progress_notify_interval_ms: parse_duration_ms(
            "experimental-watch-progress-notify-interval",
            &flags.experimental_watch_progress_notify_interval,
        )?,
        wal_segment_size_bytes: flags.experimental_wal_segment_size_bytes,
        wal_direct_io: flags.experimental_wal_direct_io,
        checkpoint: CheckpointConfig {
            interval_ms: flags.experimental_checkpoint_interval_ms.max(1),
            max_changes: flags.experimental_checkpoint_max_changes.max(1),
        },
        limits: Limits {
            max_txn_ops: flags.max_txn_ops,
            max_request_bytes: flags.max_request_bytes,
            watch_journal: JournalLimits {
                max_revisions: flags.watch_journal_max_revisions,
                ..JournalLimits::default()
            },
            // etcd: 0 is the 2 GiB default, a negative value turns the quota off.
            quota_bytes: match flags.quota_backend_bytes {
                0 => Some(DEFAULT_QUOTA_BYTES),
                bytes => u64::try_from(bytes).ok(),
            },
        },
        lease: LeaseConfig {
            min_ttl_s: LeaseConfig::min_ttl_s(flags.heartbeat_interval, flags.election_timeout),
            checkpoint_interval_ms: flags.lease_checkpoint_interval_ms.max(1),
        },
        auth_token_ttl_s: flags.auth_token_ttl.max(1),
        jwt: jwt_options(&flags.auth_token)?,
        auto_compaction,
    })
}

/// A panic on any thread stops the whole process, as an unrecovered panic stops etcd: a shard
/// executor thread that died of one would otherwise leave the others serving while that
/// shard's requests hang forever (found with a full disk, where logging itself fails).
fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
}

/// A write past the file size limit (RLIMIT_FSIZE) then fails with EFBIG, which the WAL and
/// the checkpoint handle as any failed write (a logged fatal error), instead of SIGXFSZ
/// killing the process without a word in the middle of the write.
fn ignore_file_size_signal() {
    // SAFETY: sets a signal disposition to SIG_IGN; no handler, no memory involved.
    let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    assert_ne!(previous, libc::SIG_ERR, "ignoring SIGXFSZ");
}

/// Blocks SIGINT and SIGTERM in every thread and turns their arrival into a shutdown request.
fn watch_signals(shutdown: Shutdown) {
    // SAFETY: plain libc calls on a local, initialised sigset; called before any other thread
    // starts, so every thread spawned later inherits the mask and only `sigwait` sees them.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut signal = 0;
            libc::sigwait(&set, &mut signal);
            info!("received a signal, shutting down", signal = signal);
            shutdown.request();
        });
    }
}

/// `ferrocd snapshot restore|status`: etcdctl's snapshot commands for ferrocd's snapshot files
/// (`etcdctl snapshot save` against ferrocd writes one).
#[derive(Parser, Debug)]
#[command(name = "ferrocd snapshot")]
enum SnapshotCommand {
    /// Builds a new data dir from a snapshot file (a new cluster, as etcdctl's restore).
    Restore {
        /// The snapshot file.
        file: PathBuf,
        /// The data dir to create (default: <name>.ferrocd); it must not hold anything.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Human-readable name for this member.
        #[arg(long, default_value = "default")]
        name: String,
        /// Initial cluster configuration for restore bootstrap.
        #[arg(long, default_value = "default=http://localhost:2380")]
        initial_cluster: String,
        /// Initial cluster token for the cluster during restore bootstrap.
        #[arg(long, default_value = "etcd-cluster")]
        initial_cluster_token: String,
        /// This member's peer URLs.
        #[arg(long, default_value = "http://localhost:2380")]
        initial_advertise_peer_urls: String,
        /// Shards of the restored data dir (default: number of CPUs, as the server's); may
        /// differ from the source's, keys are placed again.
        #[arg(long)]
        shards: Option<usize>,
    },
    /// Checks a snapshot file and shows its hash, revision, keys and size.
    Status {
        /// The snapshot file.
        file: PathBuf,
    },
}

fn snapshot_command(args: impl Iterator<Item = String>) -> Result<(), String> {
    match SnapshotCommand::parse_from(args) {
        SnapshotCommand::Restore {
            file,
            data_dir,
            name,
            initial_cluster,
            initial_cluster_token,
            initial_advertise_peer_urls,
            shards,
        } => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let shards = shards.unwrap_or(cpus);
            if shards == 0 || shards > 256 {
                return Err(format!("--shards {shards}: must be between 1 and 256"));
            }
            let config = RestoreConfig {
                snapshot: file,
                data_dir: data_dir.unwrap_or_else(|| PathBuf::from(format!("{name}.ferrocd"))),
                shards,
                bootstrap: Bootstrap {
                    name,
                    initial_cluster: parse_initial_cluster(&initial_cluster)?,
                    state: ClusterState::New,
                    token: initial_cluster_token,
                    advertise_peer_urls: split_urls(&initial_advertise_peer_urls),
                },
            };
            let status = restore::restore(&config)?;
            println!(
                "restored snapshot at revision {} ({} keys) into {}",
                status.revision,
                status.total_keys,
                config.data_dir.display()
            );
        }
        SnapshotCommand::Status { file } => print_status(&restore::status(&file)?),
    }
    Ok(())
}

/// etcdctl's `snapshot status` table.
fn print_status(status: &restore::SnapshotStatus) {
    let row = [
        format!("{:x}", status.hash),
        status.revision.to_string(),
        status.total_keys.to_string(),
        human_bytes(status.total_size_bytes),
    ];
    let titles = ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"];
    let widths: Vec<usize> = titles
        .iter()
        .zip(&row)
        .map(|(t, v)| t.len().max(v.len()) + 2)
        .collect();
    let rule: String = widths
        .iter()
        .map(|w| format!("+{}", "-".repeat(*w)))
        .collect();
    let line = |cells: &[&str]| -> String {
        let centered = cells.iter().zip(&widths).map(|(c, w)| format!("|{c:^w$}"));
        centered.collect::<String>() + "|"
    };
    println!("{rule}+");
    println!("{}", line(&titles));
    println!("{rule}+");
    let values: Vec<&str> = row.iter().map(String::as_str).collect();
    println!("{}", line(&values));
    println!("{rule}+");
}

/// Sizes as etcdctl prints them (go-humanize's SI units: 1 kB = 1000 bytes).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// Sets up logging first, so that every later message (a bad flag included) is a log line.
fn init_log(flags: &Flags) -> Result<(), String> {
    let level = log::Level::parse(&flags.log_level)?;
    let format = log::Format::parse(&flags.log_format)?;
    let output = log::Output::parse(&flags.log_outputs)?;
    log::init(level, format, output);
    Ok(())
}

fn main() -> ExitCode {
    // `ferrocd snapshot ...` is a tool; any other first argument is a server flag.
    if std::env::args().nth(1).as_deref() == Some("snapshot") {
        return match snapshot_command(std::env::args().skip(1)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("Error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let flags = Flags::parse();
    let config = match init_log(&flags).and_then(|()| config(&flags)) {
        Ok(config) => config,
        Err(e) => {
            error!("invalid configuration", error = e);
            return ExitCode::from(2);
        }
    };
    abort_on_panic();
    ignore_file_size_signal();
    if let Some(fault) = flags.experimental_fault_injection {
        if let Err(e) = ferrocd_engine::fault::install(fault) {
            error!("cannot install fault injection", error = e.to_string());
            return ExitCode::FAILURE;
        }
    }
    let shutdown = Shutdown::default();
    watch_signals(shutdown.clone());
    match server::run(config, shutdown) {
        Ok(()) => ExitCode::SUCCESS,
        // As etcd, whose removed member exits 0 each time it is started: a supervisor that
        // restarts failed servers does not start it again and again.
        Err(e) if e == ferrocd_net::node::meta::REMOVED => {
            error!("ferrocd stopped", error = e);
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("ferrocd stopped", error = e);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{auto_compaction, jwt_options, parse_duration_ms, AutoCompaction, Flags};
    use clap::Parser;
    use std::time::Duration;

    fn compaction(args: &[&str]) -> Result<Option<AutoCompaction>, String> {
        let flags = Flags::try_parse_from(std::iter::once("ferrocd").chain(args.iter().copied()))
            .expect("flags parse");
        auto_compaction(&flags)
    }

    #[test]
    fn auto_compaction_retention_reads_as_etcd() {
        assert_eq!(compaction(&[]), Ok(None));
        assert_eq!(compaction(&["--auto-compaction-retention", "0h"]), Ok(None));
        let hours = compaction(&["--auto-compaction-retention", "2"]);
        let two_hours = Duration::from_secs(7200);
        assert_eq!(
            hours,
            Ok(Some(AutoCompaction::Period {
                retention: two_hours
            }))
        );
        let minutes = compaction(&["--auto-compaction-retention", "30m"]);
        let half_hour = Duration::from_secs(1800);
        assert_eq!(
            minutes,
            Ok(Some(AutoCompaction::Period {
                retention: half_hour
            }))
        );
        let revisions = compaction(&[
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "1000",
        ]);
        assert!(matches!(
            revisions,
            Ok(Some(AutoCompaction::Revisions { keep: 1000, .. }))
        ));
        let bad = [
            "--auto-compaction-mode",
            "revision",
            "--auto-compaction-retention",
            "1h",
        ];
        assert!(compaction(&bad).is_err());
        assert!(compaction(&["--auto-compaction-retention", "soon"]).is_err());
    }

    #[test]
    fn auth_token_flag_reads_as_etcd() {
        assert_eq!(jwt_options("simple"), Ok(None));
        let jwt = jwt_options("jwt,pub-key=a.pem,priv-key=b.pem,sign-method=RS256,ttl=10s")
            .unwrap()
            .unwrap();
        assert_eq!(jwt.sign_method, "RS256");
        assert_eq!(jwt.pub_key.as_deref(), Some(std::path::Path::new("a.pem")));
        assert_eq!(jwt.priv_key.as_deref(), Some(std::path::Path::new("b.pem")));
        assert_eq!(jwt.ttl, Duration::from_secs(10));
        let default_ttl = jwt_options("jwt,priv-key=b.pem,sign-method=ES256").unwrap();
        assert_eq!(default_ttl.unwrap().ttl, Duration::from_secs(300));
        assert!(jwt_options("jwt,priv-key=b.pem").is_err(), "no sign-method");
        assert!(jwt_options("simple,ttl=1s").is_err());
        assert!(jwt_options("oauth").is_err());
        assert!(jwt_options("jwt,sign-method").is_err());
    }

    #[test]
    fn go_durations_parse_to_milliseconds() {
        let ms = |text| parse_duration_ms("flag", text);
        assert_eq!(ms("10m"), Ok(600_000));
        assert_eq!(ms("100ms"), Ok(100));
        assert_eq!(ms("1.5s"), Ok(1_500));
        assert_eq!(ms("1h30m"), Ok(5_400_000));
        assert!(ms("0s").is_err());
        assert!(ms("10").is_err());
        assert!(ms("5x").is_err());
        assert!(ms("").is_err());
    }
}
