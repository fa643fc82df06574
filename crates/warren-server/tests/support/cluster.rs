//! Several `warren` processes forming one cluster on loopback, for the cluster tests.
//!
//! Every member needs every member's cluster address on its command line, so the cluster
//! ports are chosen up front (bind port 0, note the port, release it) and the nodes are
//! launched together: a node only prints `warren: ready` once the cluster has formed. If a
//! port was taken in between, the whole start is retried on fresh ports and directories.
//! Nodes are numbered from 1, as their `--node-id`; AMQP and HTTP ports are picked by the
//! brokers (port 0) and read from their stdout, so they change when a node restarts.
//!
//! Methods that wait for processes block the calling thread; inside a test body run by
//! [`super::run`] they step aside with `block_in_place`, so clients' tasks keep running.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::{Broker, EXTERNAL_ENV, STARTUP_TIMEOUT, external_amqp, http_get};

/// How many times a cluster start is retried when a chosen cluster port was taken.
const START_ATTEMPTS: usize = 3;

/// A running cluster; dropping it kills every node and removes the data directories.
pub struct Cluster {
    nodes: Vec<Broker>,
    members: String,
    _temp: tempfile::TempDir,
}

/// A cluster of `size` nodes for a test that needs one, or `None` (after saying so on
/// stderr) when the tests are pointed at an external broker, which is a single process
/// the tests cannot control.
pub fn cluster(test: &str, size: usize) -> Option<Cluster> {
    if external_amqp().is_some() {
        eprintln!("skipped: {test} needs a warren cluster and {EXTERNAL_ENV} is set");
        return None;
    }
    Some(blocking(|| Cluster::start(size)))
}

/// Runs `f`, which blocks on processes, without starving the async runtime it is called
/// from (if any).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// `n` distinct loopback ports that were free a moment ago.
fn free_ports(n: usize) -> Vec<u16> {
    // All sockets are held until every port is known, so the ports differ.
    let sockets: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free loopback port"))
        .collect();
    sockets
        .iter()
        .map(|s| s.local_addr().expect("local address").port())
        .collect()
}

/// Whether a failed start is explained by a port taken between choosing and binding it.
fn port_taken(output: &str) -> bool {
    output.contains("cannot listen on") || output.contains("Address already in use")
}

impl Cluster {
    /// Starts `size` nodes and waits until each is ready; retries on fresh ports if one
    /// of the chosen cluster ports was taken meanwhile.
    pub fn start(size: usize) -> Cluster {
        assert!(size >= 1, "a cluster needs a node");
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(size) {
                Ok(c) => return c,
                Err(why) if port_taken(&why) && attempt < START_ATTEMPTS => {
                    eprintln!("cluster start attempt {attempt} lost a port, retrying");
                    last = why;
                }
                Err(why) => panic!("cluster of {size} did not start: {why}"),
            }
        }
        panic!("cluster of {size} did not start after {START_ATTEMPTS} attempts: {last}")
    }

    fn try_start(size: usize) -> Result<Cluster, String> {
        let temp = tempfile::Builder::new()
            .prefix("warren-cluster-")
            .tempdir()
            .expect("create temp dir for the cluster");
        let ports = free_ports(size);
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}@127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes: Vec<Broker> = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let id = i + 1;
                let dir: PathBuf = temp.path().join(format!("node{id}"));
                let args = vec![
                    "--node-id".to_owned(),
                    id.to_string(),
                    "--cluster-listen".to_owned(),
                    format!("127.0.0.1:{port}"),
                    "--members".to_owned(),
                    members.clone(),
                ];
                Broker::launch_in(&dir, &args)
            })
            .collect();
        for (i, node) in nodes.iter_mut().enumerate() {
            node.try_await_ready()
                .map_err(|why| format!("node {}: {why}", i + 1))?;
        }
        for (i, node) in nodes.iter().enumerate() {
            let want = ports[i];
            let got = node.cluster_addr().port();
            if got != want {
                return Err(format!(
                    "node {} listens for peers on {got}, not {want}",
                    i + 1
                ));
            }
        }
        Ok(Cluster {
            nodes,
            members,
            _temp: temp,
        })
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// The `--members` list every node was started with.
    pub fn members(&self) -> &str {
        &self.members
    }

    /// Node `id` (1-based).
    pub fn node(&self, id: usize) -> &Broker {
        &self.nodes[id - 1]
    }

    pub fn node_mut(&mut self, id: usize) -> &mut Broker {
        &mut self.nodes[id - 1]
    }

    /// AMQP URL of node `id` (changes when the node restarts).
    pub fn url(&self, id: usize) -> String {
        self.node(id).amqp_url()
    }

    pub fn http_addr(&self, id: usize) -> SocketAddr {
        self.node(id).http_addr()
    }

    /// Kills node `id` with SIGKILL; its data directory stays.
    pub fn kill9(&mut self, id: usize) {
        let node = self.node_mut(id);
        blocking(|| node.kill9());
    }

    /// Starts node `id` again on its data directory and flags (after killing it if it
    /// still runs) and waits until it is ready.
    pub fn restart(&mut self, id: usize) {
        let node = self.node_mut(id);
        blocking(|| {
            node.relaunch();
            node.await_ready();
        });
    }

    /// Sends SIGTERM to every running node at once, then waits for each to exit; returns
    /// the exit statuses by node.
    pub fn sigterm_all(&mut self) -> Vec<ExitStatus> {
        blocking(|| {
            let mut running = Vec::new();
            for (i, node) in self.nodes.iter_mut().enumerate() {
                if node.is_running() {
                    node.signal("TERM");
                    running.push(i);
                }
            }
            running
                .into_iter()
                .map(|i| self.nodes[i].wait_for_exit())
                .collect()
        })
    }

    /// Starts every node again on its data directory (killing any still running), all at
    /// once, and waits until each is ready.
    pub fn restart_all(&mut self) {
        blocking(|| {
            for node in &mut self.nodes {
                node.relaunch();
            }
            for node in &mut self.nodes {
                node.await_ready();
            }
        });
    }

    /// Body of `GET /metrics` on node `id`.
    pub fn metrics(&self, id: usize) -> String {
        let addr = self.http_addr(id);
        let (status, _, body) = blocking(|| http_get(addr, "/metrics"));
        assert_eq!(status, 200, "GET /metrics on node {id}: {body}");
        body
    }

    /// Status of `GET /readyz` on node `id`.
    pub fn readyz(&self, id: usize) -> u16 {
        let addr = self.http_addr(id);
        blocking(|| http_get(addr, "/readyz")).0
    }

    /// The stderr (logs) of node `id` so far.
    pub fn stderr(&self, id: usize) -> String {
        self.node(id).stderr_text()
    }
}

/// The value of a per-queue gauge (`warren_queue_messages_ready`,
/// `warren_queue_messages_unacked`, `warren_queue_consumers`) for `queue` in vhost `/` in a
/// `/metrics` body, if the node lists the queue.
pub fn queue_gauge(metrics: &str, gauge: &str, queue: &str) -> Option<u64> {
    let prefix = format!("{gauge}{{vhost=\"/\",queue=\"{queue}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| {
            v.trim()
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {gauge} for {queue}: {v:?}: {e}"))
        })
}

/// Deadline helper for loops that poll processes: true while `start + limit` is ahead.
pub fn before(start: Instant, limit: Duration) -> bool {
    Instant::now() < start + limit
}

/// Upper bound for a whole cluster start, for tests that time it.
pub const CLUSTER_STARTUP_TIMEOUT: Duration = STARTUP_TIMEOUT;
