//! Start-up configuration: a TOML file, `WARREN_*` environment variables and command-line
//! flags, in rising precedence, validated before anything binds a port.
//!
//! `main` builds a `Config` from here and hands it to the broker; errors name the setting so
//! an operator can fix it without reading code. Users are read here too (see `auth` for how
//! their passwords are checked).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

/// Command line and environment. Every field is optional so that "not given" can fall back
/// to the file and then to the default.
#[derive(Debug, Default, Parser)]
#[command(
    name = "warren",
    version,
    about = "Warren: a Raft-replicated AMQP 0-9-1 broker"
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "WARREN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where RocksDB keeps this node's state.
    #[arg(long, env = "WARREN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// AMQP listen address; repeat for several (default: every IPv4 and IPv6 address, 5672).
    #[arg(
        long = "amqp-listen",
        env = "WARREN_AMQP_LISTEN",
        value_delimiter = ','
    )]
    pub amqp_listen: Vec<String>,
    /// AMQP over TLS (amqps) listen address; repeat for several (default with a certificate:
    /// every IPv4 and IPv6 address, 5671).
    #[arg(long = "tls-listen", env = "WARREN_TLS_LISTEN", value_delimiter = ',')]
    pub tls_listen: Vec<String>,
    /// PEM certificate chain of the amqps listener.
    #[arg(long = "tls-cert", env = "WARREN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the amqps listener.
    #[arg(long = "tls-key", env = "WARREN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM certificates of the CAs that sign client certificates: when given, every amqps
    /// client must present a certificate signed by one of them (RabbitMQ's verify_peer with
    /// fail_if_no_peer_cert).
    #[arg(long = "tls-ca", env = "WARREN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// HTTP listen address for /healthz, /readyz and /metrics.
    #[arg(long, env = "WARREN_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// This node's id in the cluster (a positive integer).
    #[arg(long, env = "WARREN_NODE_ID")]
    pub node_id: Option<u64>,
    /// Log filter in `tracing` syntax, e.g. `info` or `warren=debug`.
    #[arg(long, env = "WARREN_LOG")]
    pub log: Option<String>,
    /// How long a delivery may stay unacknowledged before its channel is closed with 406
    /// (ms; 0 disables; default 1800000, RabbitMQ's 30 minutes).
    #[arg(long, env = "WARREN_CONSUMER_TIMEOUT_MS")]
    pub consumer_timeout_ms: Option<u64>,
    /// Node-to-node (gRPC) listen address; `off` disables it (single node, no warrenctl).
    #[arg(long, env = "WARREN_CLUSTER_LISTEN")]
    pub cluster_listen: Option<String>,
    /// Address peers use to reach this node's cluster listener (host:port).
    #[arg(long, env = "WARREN_ADVERTISE")]
    pub advertise: Option<String>,
    /// The cluster's initial members, `id@host:port`, comma-separated (this node included).
    #[arg(long, env = "WARREN_MEMBERS", value_delimiter = ',')]
    pub members: Vec<String>,
    /// Find the initial members through DNS: a host:port that resolves to every node's cluster
    /// listener (a Kubernetes headless service). Needs --expect and --advertise.
    #[arg(long, env = "WARREN_DISCOVER")]
    pub discover: Option<String>,
    /// With --discover: how many nodes form the initial cluster.
    #[arg(long, env = "WARREN_EXPECT")]
    pub expect: Option<usize>,
    /// Take the node id from the host name's trailing ordinal (`warren-2` is node 3), as a
    /// Kubernetes StatefulSet names its pods.
    #[arg(long, env = "WARREN_NODE_ID_FROM_HOSTNAME")]
    pub node_id_from_hostname: bool,
    /// Resident memory (bytes) above which publishers are blocked; 0 turns the alarm off.
    /// Default: 40 % of the machine's memory, as RabbitMQ.
    #[arg(long, env = "WARREN_MEMORY_HIGH_WATERMARK_BYTES")]
    pub memory_high_watermark_bytes: Option<u64>,
    /// Free disk space (bytes) under which publishers are blocked; 0 turns the alarm off.
    /// Default: 50 MB, as RabbitMQ.
    #[arg(long, env = "WARREN_DISK_FREE_LIMIT_BYTES")]
    pub disk_free_limit_bytes: Option<u64>,
    /// Threads that run the node's connections, queues and Raft groups (default: one per
    /// CPU the process may use).
    #[arg(long, env = "WARREN_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Size of the node's journal in bytes (default 256 MiB): written whole when the node is
    /// created; a node restarted with another size replaces its journal.
    #[arg(long, env = "WARREN_JOURNAL_BYTES")]
    pub journal_bytes: Option<u64>,
}

/// The file format. Unknown keys are an error: a misspelt setting must not be silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_id: Option<u64>,
    data_dir: Option<PathBuf>,
    log: Option<String>,
    #[serde(default)]
    amqp: FileAmqp,
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    raft: FileRaft,
    #[serde(default)]
    telemetry: FileTelemetry,
    #[serde(default)]
    cluster: FileCluster,
    #[serde(default)]
    resources: FileResources,
    #[serde(default)]
    storage: FileStorage,
    users: Option<Vec<UserConfig>>,
    loopback_users: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileResources {
    memory_high_watermark_bytes: Option<u64>,
    disk_free_limit_bytes: Option<u64>,
    worker_threads: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStorage {
    journal_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAmqp {
    listen: Option<Vec<String>>,
    frame_max: Option<u32>,
    channel_max: Option<u16>,
    heartbeat: Option<u16>,
    max_message_size: Option<u64>,
    handshake_timeout_ms: Option<u64>,
    consumer_timeout_ms: Option<u64>,
    tls_listen: Option<Vec<String>>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    tls_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRaft {
    heartbeat_ms: Option<u64>,
    election_timeout_min_ms: Option<u64>,
    election_timeout_max_ms: Option<u64>,
    snapshot_every: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCluster {
    discover: Option<String>,
    expect: Option<usize>,
    listen: Option<String>,
    advertise: Option<String>,
    members: Option<Vec<String>>,
    failure_timeout_ms: Option<u64>,
    default_replicas: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTelemetry {
    otlp_endpoint: Option<String>,
}

/// A user able to log in. Exactly one of `password` (plain) or `password_hash` (RabbitMQ's
/// salted SHA-256 format, so hashes exported from RabbitMQ work) is set.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: Option<String>,
    pub password_hash: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AmqpConfig {
    pub listen: Vec<Listen>,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
    pub max_message_size: u64,
    pub handshake_timeout_ms: u64,
    /// Unacknowledged deliveries older than this close their channel (0: never).
    pub consumer_timeout_ms: u64,
    /// The amqps listener, when a certificate is configured.
    pub tls: Option<TlsConfig>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TlsConfig {
    pub listen: Vec<Listen>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// CAs of client certificates; None: clients need none.
    pub ca_file: Option<PathBuf>,
}

impl AmqpConfig {
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.handshake_timeout_ms)
    }
}

/// A listen address and whether failing to bind it is fatal. The built-in IPv6 default is
/// not: hosts without IPv6 still start, as RabbitMQ does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
    pub optional: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RaftConfig {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub snapshot_every: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub node_id: u64,
    pub data_dir: PathBuf,
    pub log: String,
    pub amqp: AmqpConfig,
    pub http_listen: Option<SocketAddr>,
    pub raft: RaftConfig,
    pub otlp_endpoint: Option<String>,
    pub users: Vec<UserConfig>,
    pub loopback_users: Vec<String>,
    /// Node-to-node listener; None when disabled.
    pub cluster_listen: Option<SocketAddr>,
    pub advertise: String,
    /// Initial members with their cluster addresses, this node included.
    pub members: BTreeMap<u64, String>,
    pub failure_timeout_ms: u64,
    pub default_replicas: usize,
    /// DNS discovery of the initial members: the service address and the expected count.
    pub discover: Option<(String, usize)>,
    /// Resource alarms (bytes; 0: off).
    pub memory_high_watermark_bytes: u64,
    pub disk_free_limit_bytes: u64,
    /// Threads of the async runtime; None: one per CPU available to the process.
    pub worker_threads: Option<usize>,
    /// Size of the node's journal (bytes).
    pub journal_bytes: u64,
}

/// A journal smaller than this would checkpoint (flush every memtable) every few hundred
/// messages; one larger is a typo, and would be written whole before the node starts.
const JOURNAL_BYTES_RANGE: std::ops::RangeInclusive<u64> = (1 << 20)..=(64 << 30);

/// More threads than this is a typo, not a machine.
const MAX_WORKER_THREADS: usize = 1024;

/// RabbitMQ's default disk free limit.
pub const DEFAULT_DISK_FREE_LIMIT: u64 = 50_000_000;

pub const DEFAULT_FRAME_MAX: u32 = 131_072;
pub const DEFAULT_CHANNEL_MAX: u16 = 2047;
pub const DEFAULT_HEARTBEAT: u16 = 60;
/// RabbitMQ's default `consumer_timeout`: 30 minutes.
pub const DEFAULT_CONSUMER_TIMEOUT_MS: u64 = 30 * 60 * 1000;
/// RabbitMQ's default `max_message_size` (128 MiB); its hard upper bound is 512 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 128 * 1024 * 1024;
const MAX_MESSAGE_SIZE_LIMIT: u64 = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {setting}: {reason}")]
pub struct ConfigError {
    pub setting: String,
    pub reason: String,
}

fn invalid(setting: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.to_owned(),
        reason: reason.into(),
    }
}

fn parse_addr(setting: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            setting,
            format!("'{value}' is not an address:port (e.g. 127.0.0.1:5672 or [::]:5672)"),
        )
    })
}

impl Config {
    /// Loads the file named by `--config`/`WARREN_CONFIG` if any, then lays environment and
    /// flags over it.
    pub fn load(cli: Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(cli, file)
    }

    fn merge(cli: Cli, file: FileConfig) -> Result<Config, ConfigError> {
        let node_id = if cli.node_id_from_hostname {
            node_id_from_hostname(&hostname())?
        } else {
            cli.node_id.or(file.node_id).unwrap_or(1)
        };
        if node_id == 0 {
            return Err(invalid("node_id", "must be a positive integer"));
        }
        let worker_threads = cli.worker_threads.or(file.resources.worker_threads);
        if let Some(n) = worker_threads
            && !(1..=MAX_WORKER_THREADS).contains(&n)
        {
            return Err(invalid(
                "resources.worker_threads",
                format!("{n} is not between 1 and {MAX_WORKER_THREADS}"),
            ));
        }
        let journal_bytes = cli
            .journal_bytes
            .or(file.storage.journal_bytes)
            .unwrap_or(warren_cluster::DEFAULT_JOURNAL_BYTES);
        if !JOURNAL_BYTES_RANGE.contains(&journal_bytes) {
            return Err(invalid(
                "storage.journal_bytes (--journal-bytes / WARREN_JOURNAL_BYTES)",
                format!(
                    "{journal_bytes} is outside {}..={} (1 MiB to 64 GiB)",
                    JOURNAL_BYTES_RANGE.start(),
                    JOURNAL_BYTES_RANGE.end()
                ),
            ));
        }
        let data_dir = cli
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("./data"));
        if data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty"));
        }

        let listen = if !cli.amqp_listen.is_empty() {
            explicit_listeners(
                "amqp.listen (--amqp-listen / WARREN_AMQP_LISTEN)",
                &cli.amqp_listen,
            )?
        } else if let Some(list) = &file.amqp.listen {
            explicit_listeners("amqp.listen", list)?
        } else {
            vec![
                Listen {
                    addr: "0.0.0.0:5672".parse().expect("literal address"),
                    optional: false,
                },
                Listen {
                    addr: "[::]:5672".parse().expect("literal address"),
                    optional: true,
                },
            ]
        };
        if listen.is_empty() {
            return Err(invalid("amqp.listen", "at least one address is required"));
        }
        let tls = tls_config(
            &cli.tls_listen,
            &cli.tls_cert,
            &cli.tls_key,
            &cli.tls_ca,
            &file.amqp,
        )?;
        let frame_max = file.amqp.frame_max.unwrap_or(DEFAULT_FRAME_MAX);
        if !(warren_codec::FRAME_MIN_SIZE..=1_048_576).contains(&frame_max) {
            return Err(invalid(
                "amqp.frame_max",
                format!("{frame_max} is outside 4096..=1048576"),
            ));
        }
        let channel_max = file.amqp.channel_max.unwrap_or(DEFAULT_CHANNEL_MAX);
        if channel_max == 0 {
            return Err(invalid("amqp.channel_max", "must be at least 1"));
        }
        let max_message_size = file
            .amqp
            .max_message_size
            .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        if max_message_size == 0 || max_message_size > MAX_MESSAGE_SIZE_LIMIT {
            return Err(invalid(
                "amqp.max_message_size",
                format!("{max_message_size} is outside 1..={MAX_MESSAGE_SIZE_LIMIT}"),
            ));
        }
        let handshake_timeout_ms = file.amqp.handshake_timeout_ms.unwrap_or(10_000);
        if handshake_timeout_ms == 0 {
            return Err(invalid("amqp.handshake_timeout_ms", "must be positive"));
        }

        let http_listen = match cli.http_listen.or(file.http.listen) {
            Some(s) if s.is_empty() || s == "off" => None,
            Some(s) => Some(parse_addr(
                "http.listen (--http-listen / WARREN_HTTP_LISTEN)",
                &s,
            )?),
            None => Some("0.0.0.0:15692".parse().expect("literal address")),
        };

        let raft = RaftConfig {
            heartbeat_ms: file.raft.heartbeat_ms.unwrap_or(300),
            election_timeout_min_ms: file.raft.election_timeout_min_ms.unwrap_or(1000),
            election_timeout_max_ms: file.raft.election_timeout_max_ms.unwrap_or(2000),
            snapshot_every: file.raft.snapshot_every.unwrap_or(4096),
        };
        if raft.heartbeat_ms == 0 {
            return Err(invalid("raft.heartbeat_ms", "must be positive"));
        }
        if raft.election_timeout_min_ms <= raft.heartbeat_ms {
            return Err(invalid(
                "raft.election_timeout_min_ms",
                "must be greater than raft.heartbeat_ms",
            ));
        }
        if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms",
                "must be greater than raft.election_timeout_min_ms",
            ));
        }
        if raft.snapshot_every == 0 {
            return Err(invalid("raft.snapshot_every", "must be positive"));
        }

        let users = file.users.unwrap_or_else(|| {
            vec![UserConfig {
                name: "guest".into(),
                password: Some("guest".into()),
                password_hash: None,
                tags: vec!["administrator".into()],
            }]
        });
        for (i, user) in users.iter().enumerate() {
            let setting = format!("users[{i}]");
            if user.name.is_empty() {
                return Err(invalid(&format!("{setting}.name"), "must not be empty"));
            }
            match (&user.password, &user.password_hash) {
                (Some(_), None) => {}
                (None, Some(hash)) => {
                    crate::auth::decode_password_hash(hash)
                        .map_err(|reason| invalid(&format!("{setting}.password_hash"), reason))?;
                }
                _ => {
                    return Err(invalid(
                        &setting,
                        format!(
                            "user '{}' needs exactly one of password or password_hash",
                            user.name
                        ),
                    ));
                }
            }
        }
        let loopback_users = file.loopback_users.unwrap_or_else(|| vec!["guest".into()]);

        let cluster_listen = match cli.cluster_listen.or(file.cluster.listen) {
            Some(s) if s.is_empty() || s == "off" => None,
            Some(s) => Some(parse_addr(
                "cluster.listen (--cluster-listen / WARREN_CLUSTER_LISTEN)",
                &s,
            )?),
            None => Some("0.0.0.0:25672".parse().expect("literal address")),
        };
        let member_list = if cli.members.is_empty() {
            file.cluster.members.unwrap_or_default()
        } else {
            cli.members
        };
        let mut members = BTreeMap::new();
        for entry in member_list
            .iter()
            .map(|m| m.trim())
            .filter(|m| !m.is_empty())
        {
            let setting = "cluster.members (--members / WARREN_MEMBERS)";
            let (id, addr) = entry
                .split_once('@')
                .ok_or_else(|| invalid(setting, format!("'{entry}' is not id@host:port")))?;
            let id: u64 =
                id.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
                    invalid(setting, format!("'{id}' in '{entry}' is not a node id"))
                })?;
            if addr
                .rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                return Err(invalid(
                    setting,
                    format!("'{addr}' in '{entry}' is not host:port"),
                ));
            }
            if members.insert(id, addr.to_owned()).is_some() {
                return Err(invalid(setting, format!("node {id} is listed twice")));
            }
        }
        let explicit_advertise = cli.advertise.or(file.cluster.advertise);
        let discover = match (
            cli.discover.or(file.cluster.discover),
            cli.expect.or(file.cluster.expect),
        ) {
            (None, _) => None,
            (Some(_), None | Some(0)) => {
                return Err(invalid(
                    "cluster.expect (--expect / WARREN_EXPECT)",
                    "discovery needs the number of nodes that form the cluster",
                ));
            }
            (Some(service), Some(n)) => {
                if !members.is_empty() {
                    return Err(invalid(
                        "cluster.discover",
                        "give either a member list or a discovery name, not both",
                    ));
                }
                if explicit_advertise.is_none() {
                    return Err(invalid(
                        "cluster.advertise (--advertise / WARREN_ADVERTISE)",
                        "discovery needs the address peers reach this node at (e.g. the pod's DNS name)",
                    ));
                }
                Some((service, n))
            }
        };
        let advertise = match explicit_advertise {
            Some(a) => a,
            None => match members.get(&node_id) {
                Some(a) => a.clone(),
                None => {
                    let port = cluster_listen.map_or(25672, |a| a.port());
                    match cluster_listen {
                        Some(a) if !a.ip().is_unspecified() => a.to_string(),
                        _ => format!("127.0.0.1:{port}"),
                    }
                }
            },
        };
        if members.is_empty() && discover.is_none() {
            members.insert(node_id, advertise.clone());
        }
        if members.len() > 1 && cluster_listen.is_none() {
            return Err(invalid(
                "cluster.listen",
                "a node of a multi-node cluster needs its cluster listener",
            ));
        }
        let failure_timeout_ms = file.cluster.failure_timeout_ms.unwrap_or(800);
        if !(200..=60_000).contains(&failure_timeout_ms) {
            return Err(invalid(
                "cluster.failure_timeout_ms",
                format!("{failure_timeout_ms} is outside 200..=60000"),
            ));
        }
        let default_replicas = file.cluster.default_replicas.unwrap_or(3);
        if default_replicas == 0 {
            return Err(invalid("cluster.default_replicas", "must be at least 1"));
        }

        Ok(Config {
            node_id,
            data_dir,
            log: cli
                .log
                .or(file.log)
                .unwrap_or_else(|| "info,openraft=error".into()),
            amqp: AmqpConfig {
                listen,
                frame_max,
                channel_max,
                heartbeat: file.amqp.heartbeat.unwrap_or(DEFAULT_HEARTBEAT),
                max_message_size,
                handshake_timeout_ms,
                consumer_timeout_ms: cli
                    .consumer_timeout_ms
                    .or(file.amqp.consumer_timeout_ms)
                    .unwrap_or(DEFAULT_CONSUMER_TIMEOUT_MS),
                tls,
            },
            http_listen,
            raft,
            otlp_endpoint: file
                .telemetry
                .otlp_endpoint
                .or_else(|| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok())
                .filter(|s| !s.is_empty()),
            users,
            loopback_users,
            cluster_listen,
            advertise,
            members,
            failure_timeout_ms,
            default_replicas,
            discover,
            memory_high_watermark_bytes: cli
                .memory_high_watermark_bytes
                .or(file.resources.memory_high_watermark_bytes)
                .unwrap_or_else(|| {
                    warren_cluster::resources::total_memory().map_or(0, |t| t / 5 * 2)
                }),
            disk_free_limit_bytes: cli
                .disk_free_limit_bytes
                .or(file.resources.disk_free_limit_bytes)
                .unwrap_or(DEFAULT_DISK_FREE_LIMIT),
            worker_threads,
            journal_bytes,
        })
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_default()
}

/// `warren-0` → 1, `warren-2` → 3: StatefulSet ordinals start at 0, node ids at 1.
fn node_id_from_hostname(host: &str) -> Result<u64, ConfigError> {
    let short = host.split('.').next().unwrap_or(host);
    short
        .rsplit_once('-')
        .and_then(|(_, ordinal)| ordinal.parse::<u64>().ok())
        .map(|o| o + 1)
        .ok_or_else(|| {
            invalid(
                "node_id (--node-id-from-hostname)",
                format!("host name '{host}' does not end in -<ordinal>"),
            )
        })
}

/// The amqps listener: off unless a certificate and key are given; then on 5671 of every
/// address unless told where. Unreadable files stop start-up here, naming the setting.
fn tls_config(
    tls_listen: &[String],
    tls_cert: &Option<PathBuf>,
    tls_key: &Option<PathBuf>,
    tls_ca: &Option<PathBuf>,
    file: &FileAmqp,
) -> Result<Option<TlsConfig>, ConfigError> {
    let cert = tls_cert.clone().or_else(|| file.tls_cert_file.clone());
    let key = tls_key.clone().or_else(|| file.tls_key_file.clone());
    let ca_file = tls_ca.clone().or_else(|| file.tls_ca_file.clone());
    let explicit = if !tls_listen.is_empty() {
        Some(explicit_listeners(
            "amqp.tls_listen (--tls-listen / WARREN_TLS_LISTEN)",
            tls_listen,
        )?)
    } else if let Some(list) = &file.tls_listen {
        Some(explicit_listeners("amqp.tls_listen", list)?)
    } else {
        None
    };
    let (cert_file, key_file) = match (cert, key) {
        (None, None) if explicit.is_none() && ca_file.is_none() => return Ok(None),
        (None, _) => {
            return Err(invalid(
                "amqp.tls_cert_file (--tls-cert / WARREN_TLS_CERT)",
                "an amqps listener needs a certificate",
            ));
        }
        (_, None) => {
            return Err(invalid(
                "amqp.tls_key_file (--tls-key / WARREN_TLS_KEY)",
                "an amqps listener needs a private key",
            ));
        }
        (Some(c), Some(k)) => (c, k),
    };
    for (setting, path) in [
        (
            "amqp.tls_cert_file (--tls-cert / WARREN_TLS_CERT)",
            &cert_file,
        ),
        ("amqp.tls_key_file (--tls-key / WARREN_TLS_KEY)", &key_file),
    ]
    .into_iter()
    .chain(
        ca_file
            .as_ref()
            .map(|ca| ("amqp.tls_ca_file (--tls-ca / WARREN_TLS_CA)", ca)),
    ) {
        if let Err(e) = std::fs::metadata(path) {
            return Err(invalid(
                setting,
                format!("cannot read {}: {e}", path.display()),
            ));
        }
    }
    let listen = explicit.unwrap_or_else(|| {
        vec![
            Listen {
                addr: "0.0.0.0:5671".parse().expect("literal address"),
                optional: false,
            },
            Listen {
                addr: "[::]:5671".parse().expect("literal address"),
                optional: true,
            },
        ]
    });
    Ok(Some(TlsConfig {
        listen,
        cert_file,
        key_file,
        ca_file,
    }))
}

fn explicit_listeners(setting: &str, values: &[String]) -> Result<Vec<Listen>, ConfigError> {
    values
        .iter()
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            Ok(Listen {
                addr: parse_addr(setting, v.trim())?,
                optional: false,
            })
        })
        .collect()
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid("config", format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| invalid("config", format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| invalid("config", e.to_string()))?;
        Config::merge(Cli::default(), file)
    }

    #[test]
    fn defaults_listen_everywhere_with_optional_ipv6() {
        let c = from_toml("").unwrap();
        assert_eq!(c.amqp.listen.len(), 2);
        assert!(!c.amqp.listen[0].optional && c.amqp.listen[1].optional);
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.users[0].name, "guest");
        assert_eq!(c.loopback_users, vec!["guest".to_string()]);
    }

    #[test]
    fn worker_threads_default_to_the_cpus_and_a_flag_beats_the_file() {
        assert_eq!(from_toml("").unwrap().worker_threads, None);
        let file: FileConfig = toml::from_str("[resources]\nworker_threads = 4\n").unwrap();
        assert_eq!(
            Config::merge(Cli::default(), file).unwrap().worker_threads,
            Some(4)
        );
        let file: FileConfig = toml::from_str("[resources]\nworker_threads = 4\n").unwrap();
        let cli = Cli {
            worker_threads: Some(1),
            ..Cli::default()
        };
        assert_eq!(Config::merge(cli, file).unwrap().worker_threads, Some(1));
    }

    #[test]
    fn the_journal_size_defaults_to_256_mib_is_bounded_and_a_flag_beats_the_file() {
        assert_eq!(from_toml("").unwrap().journal_bytes, 256 << 20);
        let file = "[storage]\njournal_bytes = 16777216\n";
        assert_eq!(from_toml(file).unwrap().journal_bytes, 16 << 20);
        let cli = Cli {
            journal_bytes: Some(8 << 20),
            ..Cli::default()
        };
        let merged = Config::merge(cli, toml::from_str(file).unwrap()).unwrap();
        assert_eq!(merged.journal_bytes, 8 << 20);
        for wrong in [0u64, 4096, (1 << 20) - 1, (64 << 30) + 1] {
            let e = from_toml(&format!("[storage]\njournal_bytes = {wrong}\n")).unwrap_err();
            assert_eq!(
                e.setting,
                "storage.journal_bytes (--journal-bytes / WARREN_JOURNAL_BYTES)"
            );
            assert!(e.reason.starts_with(&wrong.to_string()), "{}", e.reason);
        }
        assert!(from_toml("[storage]\njournal_bytes = 1048576\n").is_ok());
    }

    #[test]
    fn flags_override_file() {
        let file: FileConfig =
            toml::from_str("data_dir = \"/from/file\"\n[amqp]\nlisten = [\"127.0.0.1:1\"]\n")
                .unwrap();
        let cli = Cli {
            data_dir: Some("/from/flag".into()),
            amqp_listen: vec!["127.0.0.1:2".into()],
            ..Cli::default()
        };
        let c = Config::merge(cli, file).unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.amqp.listen[0].addr.port(), 2);
    }

    #[test]
    fn errors_name_the_setting() {
        let e = from_toml("[amqp]\nframe_max = 100\n").unwrap_err();
        assert_eq!(e.setting, "amqp.frame_max");
        let e = from_toml("[amqp]\nlisten = [\"nonsense\"]\n").unwrap_err();
        assert_eq!(e.setting, "amqp.listen");
        let e = from_toml("node_id = 0\n").unwrap_err();
        assert_eq!(e.setting, "node_id");
        let e = from_toml("[resources]\nworker_threads = 0\n").unwrap_err();
        assert_eq!(e.setting, "resources.worker_threads");
        let e =
            from_toml("[raft]\nheartbeat_ms = 500\nelection_timeout_min_ms = 400\n").unwrap_err();
        assert_eq!(e.setting, "raft.election_timeout_min_ms");
        let e = from_toml("[[users]]\nname = \"a\"\n").unwrap_err();
        assert_eq!(e.setting, "users[0]");
        let e = from_toml("[[users]]\nname = \"a\"\npassword_hash = \"!!\"\n").unwrap_err();
        assert_eq!(e.setting, "users[0].password_hash");
    }

    #[test]
    fn cluster_members_and_advertise() {
        let c = from_toml(
            "node_id = 2\n[cluster]\nmembers = [\"1@10.0.0.1:25672\", \"2@10.0.0.2:25672\"]\n",
        )
        .unwrap();
        assert_eq!(c.members.len(), 2);
        assert_eq!(c.advertise, "10.0.0.2:25672");
        let single = from_toml("").unwrap();
        assert_eq!(single.members.len(), 1);
        assert_eq!(single.members[&1], single.advertise);
        let e = from_toml("[cluster]\nmembers = [\"x@h:1\"]\n").unwrap_err();
        assert!(e.setting.starts_with("cluster.members"));
        let e = from_toml("[cluster]\nmembers = [\"1@h:1\", \"1@h:2\"]\n").unwrap_err();
        assert!(e.reason.contains("twice"));
        let e = from_toml("[cluster]\nmembers = [\"1@nohost\"]\n").unwrap_err();
        assert!(e.setting.starts_with("cluster.members"));
        let e = from_toml("[cluster]\nfailure_timeout_ms = 5\n").unwrap_err();
        assert_eq!(e.setting, "cluster.failure_timeout_ms");
    }

    #[test]
    fn node_ids_from_statefulset_host_names() {
        assert_eq!(node_id_from_hostname("warren-0").unwrap(), 1);
        assert_eq!(
            node_id_from_hostname("warren-12.warren.ns.svc").unwrap(),
            13
        );
        assert!(node_id_from_hostname("warren").is_err());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = toml::from_str::<FileConfig>("[amqp]\nframe_maks = 1\n").unwrap_err();
        assert!(e.to_string().contains("frame_maks"));
    }

    #[test]
    fn tls_needs_both_files_and_names_the_missing_one() {
        let e = from_toml("[amqp]\ntls_cert_file = \"/etc/hostname\"\n").unwrap_err();
        assert!(e.setting.starts_with("amqp.tls_key_file"), "{e}");
        let e = from_toml("[amqp]\ntls_listen = [\"127.0.0.1:5671\"]\n").unwrap_err();
        assert!(e.setting.starts_with("amqp.tls_cert_file"), "{e}");
        let e = from_toml(
            "[amqp]\ntls_cert_file = \"/nonexistent.pem\"\ntls_key_file = \"/etc/hostname\"\n",
        )
        .unwrap_err();
        assert!(e.setting.starts_with("amqp.tls_cert_file"), "{e}");
        let c = from_toml("").unwrap();
        assert_eq!(c.amqp.tls, None, "off by default");
    }
}
