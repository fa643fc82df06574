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
    /// Cluster port of each node, by id - 1 (chosen before launch).
    ports: Vec<u16>,
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
            ports,
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

// ---------------------------------------------------------------------------------------------
// Nodes that join a running cluster

impl Cluster {
    /// Cluster address of node `id` (`warren: listening cluster ADDR`), known before the
    /// node is ready since its port was chosen up front: what `warrenctl --node` and
    /// `warrenctl add-node` take.
    pub fn cluster_addr(&self, id: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports[id - 1]))
    }

    /// Launches node `size + 1` with the member list the cluster was started with, which
    /// does not name it, and returns its id. Such a node waits to be added (`warrenctl
    /// add-node`) and only then prints `warren: ready`, so this returns once it listens for
    /// peers; await its readiness with [`Cluster::await_ready`] after adding it. Retries on
    /// a fresh port if the chosen one was taken meanwhile.
    pub fn launch_joiner(&mut self) -> usize {
        let id = self.nodes.len() + 1;
        let dir = self._temp.path().join(format!("node{id}"));
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let port = free_ports(1)[0];
            let args = vec![
                "--node-id".to_owned(),
                id.to_string(),
                "--cluster-listen".to_owned(),
                format!("127.0.0.1:{port}"),
                "--members".to_owned(),
                self.members.clone(),
            ];
            let mut node = Broker::launch_in(&dir, &args);
            let listening = format!("warren: listening cluster 127.0.0.1:{port}");
            let start = Instant::now();
            let up = blocking(|| {
                while before(start, STARTUP_TIMEOUT) {
                    if node.stdout_text().contains(&listening) {
                        return true;
                    }
                    if !node.is_running() {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                false
            });
            if up {
                self.nodes.push(node);
                self.ports.push(port);
                return id;
            }
            last = format!(
                "--- stdout ---\n{}\n--- stderr ---\n{}",
                node.stdout_text(),
                node.stderr_text()
            );
            if !(port_taken(&last) && attempt < START_ATTEMPTS) {
                break;
            }
            eprintln!("joining node {id} lost its port, retrying");
        }
        panic!("node {id} did not start listening for peers: {last}")
    }

    /// Waits until node `id` prints `warren: ready` (within the harness's start-up limit),
    /// e.g. a node launched with [`Cluster::launch_joiner`] once it has been added.
    pub fn await_ready(&mut self, id: usize) {
        let node = self.node_mut(id);
        blocking(|| node.await_ready());
    }

    /// Whether node `id` has printed `warren: ready` (in any run so far).
    pub fn printed_ready(&self, id: usize) -> bool {
        self.node(id)
            .stdout_text()
            .lines()
            .any(|l| l.trim() == "warren: ready")
    }

    /// Sends SIGTERM to node `id` and waits for it to exit (failing the test if it does not
    /// within the harness's shutdown limit).
    pub fn sigterm(&mut self, id: usize) -> ExitStatus {
        let node = self.node_mut(id);
        blocking(|| node.sigterm())
    }

    /// Runs `warrenctl --node <node id's cluster address> ARGS`.
    pub async fn ctl(&self, id: usize, args: &[&str]) -> CtlOutput {
        warrenctl(self.cluster_addr(id), args).await
    }

    /// `warrenctl status` through node `id`, parsed; fails the test if the command fails or
    /// prints something [`Status::parse`] does not understand.
    pub async fn status(&self, id: usize) -> Status {
        self.try_status(id)
            .await
            .unwrap_or_else(|e| panic!("warrenctl status through node {id}: {e}"))
    }

    /// Like [`Cluster::status`], with failures as errors (for polling loops).
    pub async fn try_status(&self, id: usize) -> Result<Status, String> {
        let out = self.ctl(id, &["status"]).await;
        if !out.success() {
            return Err(out.describe());
        }
        Status::parse(&out.stdout)
    }
}

// ---------------------------------------------------------------------------------------------
// warrenctl

/// Environment variable overriding the `warrenctl` binary (default: next to `warren`).
pub const CTL_ENV: &str = "WARREN_TEST_CTL";
/// Upper bound for one warrenctl run; its own per-call timeout is shorter.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(45);
/// The per-call timeout passed to warrenctl (`--timeout`, seconds).
const CTL_CALL_TIMEOUT_SECS: &str = "30";

/// The admin command line: from [`CTL_ENV`], else the `warrenctl` cargo built next to the
/// `warren` binary under test. Cargo builds it only when asked (`cargo build -p warrenctl`,
/// or `cargo test --workspace`), so a missing binary fails with instructions.
pub fn warrenctl_bin() -> PathBuf {
    if let Some(p) = std::env::var_os(CTL_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let warren = PathBuf::from(env!("CARGO_BIN_EXE_warren"));
    let dir = warren.parent().expect("the warren binary has a directory");
    let ctl = dir.join(format!("warrenctl{}", std::env::consts::EXE_SUFFIX));
    assert!(
        ctl.is_file(),
        "warrenctl not found at {}: build it first (`cargo build -p warrenctl`; `cargo test \
         --workspace` builds it too) or name it in {CTL_ENV}",
        ctl.display()
    );
    ctl
}

/// What one warrenctl run printed.
#[derive(Debug)]
pub struct CtlOutput {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The command line, exit status and output, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "`warrenctl {}` exited with {}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.args.join(" "),
            self.status,
            self.stdout,
            self.stderr
        )
    }

    /// Fails the test unless the command succeeded; returns its stdout.
    #[track_caller]
    pub fn expect_ok(self) -> String {
        assert!(self.success(), "{}", self.describe());
        self.stdout
    }
}

/// Runs `warrenctl --node NODE ARGS` (the process is killed if it outlives [`CTL_TIMEOUT`]).
pub async fn warrenctl(node: SocketAddr, args: &[&str]) -> CtlOutput {
    let node = node.to_string();
    let mut full: Vec<String> = vec![
        "--node".into(),
        node,
        "--timeout".into(),
        CTL_CALL_TIMEOUT_SECS.into(),
    ];
    full.extend(args.iter().map(|a| a.to_string()));
    let mut cmd = tokio::process::Command::new(warrenctl_bin());
    cmd.args(&full)
        .env_remove("WARREN_NODE")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(CTL_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("run warrenctl {}: {e}", full.join(" ")),
        Err(_) => panic!(
            "`warrenctl {}` did not finish within {CTL_TIMEOUT:?}",
            full.join(" ")
        ),
    };
    CtlOutput {
        args: full,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `warrenctl status` as printed: the members one node sees and every group with its
/// leader, replicas, log indexes, message counts and follower lag.
#[derive(Debug, Clone)]
pub struct Status {
    /// The node that answered.
    pub node: u64,
    pub members: Vec<MemberRow>,
    pub groups: Vec<GroupRow>,
    /// The text, for failure messages.
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub id: u64,
    pub address: String,
    pub voter: bool,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRow {
    pub group: u64,
    /// `vhost/queue`, or `metadata`.
    pub name: String,
    /// `None` when the node knows no leader (`-`).
    pub leader: Option<u64>,
    /// Preferred leader first.
    pub replicas: Vec<u64>,
    pub last_log: u64,
    pub applied: u64,
    pub ready: u64,
    pub unacked: u64,
    /// Per replica, entries behind the leader (the leader lists itself too); only the
    /// group's leader reports it.
    pub lag: std::collections::BTreeMap<u64, u64>,
}

impl Status {
    /// Parses warrenctl's status output; an error quotes the line it could not read.
    pub fn parse(text: &str) -> Result<Status, String> {
        let bad = |what: &str, line: &str| format!("{what} in status line {line:?}:\n{text}");
        let num = |s: &str, line: &str| -> Result<u64, String> {
            s.parse::<u64>()
                .map_err(|_| bad(&format!("{s:?} is not a number"), line))
        };
        let mut lines = text.lines();
        let head = lines
            .next()
            .ok_or_else(|| format!("empty status:\n{text}"))?;
        let node = head
            .strip_prefix("node ")
            .and_then(|r| r.split_whitespace().next())
            .ok_or_else(|| bad("no `node N sees` header", head))?;
        let node = num(node, head)?;
        let mut members = Vec::new();
        for line in lines.by_ref() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.is_empty() {
                break;
            }
            let [id, address, role, up] = fields[..] else {
                return Err(bad("not a member row", line));
            };
            let voter = match role {
                "voter" => true,
                "learner" => false,
                _ => return Err(bad("unknown role", line)),
            };
            let up = match up {
                "up" => true,
                "DOWN" => false,
                _ => return Err(bad("unknown liveness", line)),
            };
            members.push(MemberRow {
                id: num(id, line)?,
                address: address.to_owned(),
                voter,
                up,
            });
        }
        let header = lines
            .next()
            .ok_or_else(|| format!("no group table:\n{text}"))?;
        if !header.trim_start().starts_with("group") {
            return Err(bad("not the group table's header", header));
        }
        let mut groups = Vec::new();
        for line in lines {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.is_empty() {
                continue;
            }
            // Lag entries (`node:entries`) close the row; an empty replica list leaves a
            // blank column, so the numbers are counted from the end.
            let lag_from = fields
                .iter()
                .skip(3)
                .position(|f| f.contains(':'))
                .map_or(fields.len(), |p| p + 3);
            let (cols, lag) = fields.split_at(lag_from);
            if cols.len() != 7 && cols.len() != 8 {
                return Err(bad("not a group row", line));
            }
            let n = cols.len();
            let replicas = if n == 8 {
                cols[3]
                    .split(',')
                    .map(|r| num(r, line))
                    .collect::<Result<Vec<_>, _>>()?
            } else {
                Vec::new()
            };
            let lag = lag
                .iter()
                .map(|entry| {
                    let (node, behind) = entry.split_once(':').expect("has a colon");
                    Ok((num(node, line)?, num(behind, line)?))
                })
                .collect::<Result<_, String>>()?;
            groups.push(GroupRow {
                group: num(cols[0], line)?,
                name: cols[1].to_owned(),
                leader: match cols[2] {
                    "-" => None,
                    l => Some(num(l, line)?),
                },
                replicas,
                last_log: num(cols[n - 4], line)?,
                applied: num(cols[n - 3], line)?,
                ready: num(cols[n - 2], line)?,
                unacked: num(cols[n - 1], line)?,
                lag,
            });
        }
        Ok(Status {
            node,
            members,
            groups,
            text: text.to_owned(),
        })
    }

    /// The row of queue `name` in vhost `vhost`.
    pub fn queue(&self, vhost: &str, name: &str) -> Option<&GroupRow> {
        let full = format!("{vhost}/{name}");
        self.groups.iter().find(|g| g.name == full)
    }

    /// The metadata group's row.
    pub fn metadata(&self) -> Option<&GroupRow> {
        self.groups.iter().find(|g| g.group == 0)
    }

    pub fn member(&self, id: u64) -> Option<&MemberRow> {
        self.members.iter().find(|m| m.id == id)
    }
}
