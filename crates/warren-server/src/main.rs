//! The `warren` binary: reads configuration, opens the node, listens for AMQP and HTTP, and
//! shuts down cleanly on SIGTERM/SIGINT.
//!
//! Start-up prints one line per bound listener and then `warren: ready` on stdout, so scripts
//! and tests learn the ports (port 0 picks a free one) and know when clients are served.

mod access;
mod auth;
mod broker;
mod channel;
mod config;
mod connection;
mod connections;
mod definitions;
mod http;
mod management;
mod messages_api;
mod metrics;
mod rates;
mod telemetry;
mod tls;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tracing::{error, info, warn};
use warren_cluster::admin::AdminService;
use warren_cluster::grpc::{self, GrpcTransport};
use warren_cluster::{Node, NodeConfig, NodeHandler, NodeSlot};

use crate::broker::Broker;
use crate::config::{Cli, Config, Listen};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren: {e}");
            return ExitCode::from(2);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("warren");
    if let Some(n) = config.worker_threads {
        runtime.worker_threads(n);
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Binds one TCP listener. IPv6 wildcard sockets are IPv6-only so they can sit beside the
/// IPv4 wildcard on the same port, as RabbitMQ's default listeners do.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

fn bind_all(setting: &str, listen: &[Listen]) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for l in listen {
        match bind(l.addr) {
            Ok(listener) => listeners.push(listener),
            Err(e) if l.optional => {
                warn!(addr = %l.addr, error = %e, "skipping optional listener");
            }
            Err(e) => anyhow::bail!("{setting}: cannot listen on {}: {e}", l.addr),
        }
    }
    Ok(listeners)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let telemetry = telemetry::init(&config.log, config.otlp_endpoint.as_deref())?;
    // Installed before anything is announced, so a signal right after "ready" is handled.
    let signals = Signals::install()?;
    // The cluster listener is bound first: a port conflict should stop start-up before any
    // storage is touched, and peers can reach the node as soon as its groups exist.
    let cluster_listener = match config.cluster_listen {
        Some(addr) => Some(
            bind(addr)
                .map_err(|e| anyhow::anyhow!("cluster.listen: cannot listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    // Peers can say hello (discovery) before this node has opened its storage.
    let slot = NodeSlot::new();
    let (cluster_stop_tx, cluster_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cluster_server = match cluster_listener {
        Some(listener) => {
            println!("warren: listening cluster {}", listener.local_addr()?);
            let handler = Arc::new(NodeHandler::new(
                slot.clone(),
                config.node_id,
                config.advertise.clone(),
            ));
            let admin = AdminService::server(slot.clone());
            Some(tokio::spawn(grpc::serve(
                listener,
                handler,
                admin,
                async move {
                    let _ = cluster_stop_rx.await;
                },
            )))
        }
        None => None,
    };
    let members = match &config.discover {
        Some((service, expect)) => {
            info!(%service, expect, "discovering cluster members");
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            grpc::discover_members(service, *expect, deadline)
                .await
                .map_err(|e| anyhow::anyhow!("cluster.discover: {e}"))?
        }
        None => config.members.clone(),
    };
    let transport = GrpcTransport::new();
    let node = Node::start(
        NodeConfig {
            node_id: config.node_id,
            data_dir: config.data_dir.clone(),
            advertise: config.advertise.clone(),
            members: members.clone(),
            heartbeat_ms: config.raft.heartbeat_ms,
            election_timeout_min_ms: config.raft.election_timeout_min_ms,
            election_timeout_max_ms: config.raft.election_timeout_max_ms,
            snapshot_every: config.raft.snapshot_every,
            failure_timeout_ms: config.failure_timeout_ms,
            page_window: warren_cluster::DEFAULT_PAGE_WINDOW,
            election_fallback_ms: warren_cluster::DEFAULT_ELECTION_FALLBACK_MS,
            journal_bytes: config.journal_bytes,
        },
        transport,
    )
    .await
    .map_err(|e| anyhow::anyhow!("cannot open the node: {e}"))?;
    // Fail-stop: a node whose storage failed can write nothing more, and a restart replays
    // the journal and catches up from the peers (a full disk: once space is freed).
    node.storage().on_failure(|e| {
        eprintln!("warren: storage failed ({e}); exiting so that a restart recovers the node");
        std::process::exit(74);
    });
    slot.set(&node);
    let resources = warren_cluster::resources::ResourceMonitor::new(
        config.data_dir.clone(),
        config.memory_high_watermark_bytes,
        config.disk_free_limit_bytes,
    );
    tokio::spawn(warren_cluster::resources::ResourceMonitor::run(
        Arc::downgrade(&resources),
    ));
    node.set_resource_monitor(resources);
    // A node that is not among the initial members waits to be added (warrenctl add-node).
    let joining = !members.contains_key(&config.node_id);
    let ready_timeout = if joining {
        Duration::from_secs(24 * 3600)
    } else {
        Duration::from_secs(120)
    };
    if joining {
        info!(node = config.node_id, "waiting to be added to the cluster");
    }
    node.wait_ready(ready_timeout)
        .await
        .map_err(|e| anyhow::anyhow!("cannot join the cluster: {e}"))?;

    let amqp = bind_all("amqp.listen", &config.amqp.listen)?;
    let amqps = match &config.amqp.tls {
        Some(tls) => {
            let acceptor = tls::acceptor(&tls.cert_file, &tls.key_file, tls.ca_file.as_deref())
                .map_err(|e| {
                    anyhow::anyhow!("amqp.tls_cert_file / tls_key_file / tls_ca_file: {e}")
                })?;
            Some((bind_all("amqp.tls_listen", &tls.listen)?, acceptor))
        }
        None => None,
    };
    let http_listener = match config.http_listen {
        Some(addr) => Some(
            bind(addr).map_err(|e| anyhow::anyhow!("http.listen: cannot listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    let broker = Broker::new(config, node.clone());
    rates::start(&broker.rates, &node, &broker.metrics);
    node.set_service(Arc::new(connections::ConnectionService {
        table: broker.connections.clone(),
        rates: broker.rates.clone(),
        node_name: management::node_name(node.id()),
    }));
    for listener in &amqp {
        println!("warren: listening amqp {}", listener.local_addr()?);
    }
    if let Some(l) = http_listener {
        println!("warren: listening http {}", l.local_addr()?);
        tokio::spawn(http::serve(l, broker.clone()));
    }
    let mut accept_tasks = Vec::new();
    for listener in amqp {
        accept_tasks.push(tokio::spawn(accept_loop(listener, broker.clone(), None)));
    }
    if let Some((listeners, acceptor)) = amqps {
        for listener in listeners {
            println!("warren: listening amqps {}", listener.local_addr()?);
            accept_tasks.push(tokio::spawn(accept_loop(
                listener,
                broker.clone(),
                Some(acceptor.clone()),
            )));
        }
    }
    broker.ready.store(true, Ordering::Release);
    println!("warren: ready");
    info!("ready");

    signals.wait().await;
    info!("shutting down");
    broker.ready.store(false, Ordering::Release);
    let _ = broker.shutdown.send(true);
    for task in &accept_tasks {
        task.abort();
    }
    // Connections close with 320 and wait briefly for close-ok; give them that long.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while broker.metrics.connections.load(Ordering::Relaxed) > 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
    let _ = cluster_stop_tx.send(());
    if let Some(server) = cluster_server {
        let _ = server.await;
    }
    telemetry.shutdown().await;
    info!("stopped");
    Ok(())
}

/// Accepts clients; with `tls`, each connection first completes a TLS handshake within the
/// AMQP handshake timeout (a client that never finishes it holds nothing for long).
async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let addrs = connection::Addresses {
                    peer,
                    local: stream.local_addr().unwrap_or(peer),
                    tls: tls.is_some(),
                };
                match &tls {
                    None => {
                        tokio::spawn(connection::serve(broker.clone(), stream, addrs));
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        let broker = broker.clone();
                        tokio::spawn(async move {
                            let limit = broker.config.amqp.handshake_timeout();
                            match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                                Ok(Ok(tls_stream)) => {
                                    connection::serve(broker, tls_stream, addrs).await;
                                }
                                Ok(Err(e)) => {
                                    info!(%peer, error = %e, "TLS handshake failed");
                                }
                                Err(_) => info!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
