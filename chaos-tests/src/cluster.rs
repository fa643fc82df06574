//! The `warren` processes of a run, each in its own network namespace (`net.rs`).
//!
//! A node is started with `ip netns exec wchaos-n<i> warren --node-id i ...` listening on
//! its namespace's address (AMQP 5672, HTTP 15692, peers 25672), with its stdout and stderr
//! appended to `nodes/n<i>/stdout.log` and `nodes/n<i>/warren.log` in the run directory, so a
//! restart keeps the earlier runs' output. Readiness is the `warren: ready` line on stdout.
//! The nemesis (`nemesis.rs`) kills, pauses, restarts and replaces nodes through this
//! module; the workload only learns addresses from it (`Targets`).
//!
//! Clock faults use libfaketime: for the `clock` nemesis every node runs with the library
//! preloaded and a per-node timestamp file holding its wall-clock offset (monotonic time
//! untouched), which the nemesis rewrites; a drifting clock is a restart with a rate
//! (`+0 x1.5`) applied to every clock, monotonic ones included. The `disk` nemesis puts
//! one node's data directory on a small tmpfs (`TMPFS_MARKER` in the path, for cleanup).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::net::{self, Net, TMPFS_MARKER};

pub const AMQP_PORT: u16 = 5672;
pub const HTTP_PORT: u16 = 15692;
pub const CLUSTER_PORT: u16 = 25672;

/// How long a node may take from spawn to `warren: ready` (a debug build on two busy cores,
/// replaying its log).
pub const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a node may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the binaries are.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub warren: PathBuf,
    pub warrenctl: PathBuf,
}

/// How a node's clocks are faked.
#[derive(Clone, Debug, PartialEq)]
pub enum Clock {
    Real,
    /// libfaketime reads the wall-clock offset from this file (monotonic clocks are real).
    OffsetFile(PathBuf),
    /// Every clock, monotonic included, runs at this rate from the node's start.
    Rate(f64),
}

struct NodeProc {
    dir: PathBuf,
    data_dir: PathBuf,
    child: Option<Child>,
    paused: bool,
    clock: Clock,
    /// `warren: ready` lines in stdout.log before the current start.
    ready_before: usize,
    starts: u32,
    /// Started with the smallest journal (the disk nemesis's node): see [`DISK_NODE_JOURNAL`].
    small_journal: bool,
}

/// The journal of the node whose disk fills. A journal is written whole when the node is
/// created, so a full disk fails no journal write: it fails the next checkpoint's flush of the
/// memtables, which a 1 MiB ring asks for every 256 KiB written, within each fault window
/// (the other nodes' 16 MiB rings checkpoint every 4 MiB).
const DISK_NODE_JOURNAL: &str = "1048576";

/// The node addresses clients may use, shared with the workload: the nemesis updates it
/// when membership changes.
#[derive(Clone, Default)]
pub struct Targets(Arc<RwLock<Vec<u64>>>);

impl Targets {
    pub fn set(&self, nodes: Vec<u64>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = nodes;
    }

    pub fn get(&self) -> Vec<u64> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub struct Cluster {
    pub net: Net,
    nodes: BTreeMap<u64, NodeProc>,
    /// The cluster's members as the harness last changed them.
    members: BTreeSet<u64>,
    next_id: u64,
    bins: Binaries,
    run_dir: PathBuf,
    data_root: PathBuf,
    config: PathBuf,
    faketime_lib: Option<PathBuf>,
    clock_files: bool,
    tmpfs: Vec<PathBuf>,
    pub targets: Targets,
}

/// Where libfaketime's multi-threaded library is, if installed.
pub fn faketime_library() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
        "/usr/local/lib/faketime/libfaketimeMT.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
}

pub struct ClusterOptions {
    pub size: usize,
    pub bins: Binaries,
    pub run_dir: PathBuf,
    pub data_root: PathBuf,
    /// Preload libfaketime with an offset file on every node (the clock nemesis).
    pub clock_files: bool,
    /// Put this node's data directory on a tmpfs of this many MiB (the disk nemesis).
    pub tmpfs: Option<(u64, u64)>,
}

impl Cluster {
    /// Creates the network and starts `size` nodes, returning once every one is ready.
    pub async fn start(opts: ClusterOptions) -> anyhow::Result<Cluster> {
        let net = Net::create()?;
        std::fs::create_dir_all(&opts.data_root)?;
        let config = opts.run_dir.join("warren.toml");
        // The clients connect from the bridge address, not loopback, so guest must be
        // allowed from anywhere; a short AMQP heartbeat lets clients notice a paused node.
        // Snapshots every 512 entries (not 4,096) so that a run of 20 s takes several per
        // queue: crashes then hit queues whose bodies are partly on disk (written for a
        // snapshot) and partly only in the log, whose logs are purged, and nodes that come
        // back may need a snapshot sent to them. A 16 MiB journal (not 256 MiB) fits the disk
        // nemesis's small tmpfs, and wraps and checkpoints several times a run, so crashes
        // also hit a journal on its later laps.
        std::fs::write(
            &config,
            "loopback_users = []\n\n[amqp]\nheartbeat = 5\n\n[raft]\nsnapshot_every = 512\n\n\
             [storage]\njournal_bytes = 16777216\n",
        )?;
        let faketime_lib = faketime_library();
        if opts.clock_files && faketime_lib.is_none() {
            bail!("the clock nemesis needs libfaketime (apt-get install faketime)");
        }
        let mut c = Cluster {
            net,
            nodes: BTreeMap::new(),
            members: (1..=opts.size as u64).collect(),
            next_id: opts.size as u64 + 1,
            bins: opts.bins,
            run_dir: opts.run_dir,
            data_root: opts.data_root,
            config,
            faketime_lib,
            clock_files: opts.clock_files,
            tmpfs: Vec::new(),
            targets: Targets::default(),
        };
        for id in 1..=opts.size as u64 {
            c.net.add_host(id)?;
            let tmpfs_mib = opts.tmpfs.filter(|(n, _)| *n == id).map(|(_, m)| m);
            c.prepare(id, tmpfs_mib)?;
        }
        for id in 1..=opts.size as u64 {
            c.spawn(id)?;
        }
        for id in 1..=opts.size as u64 {
            c.wait_ready(id, READY_TIMEOUT).await?;
        }
        c.targets.set(c.members.iter().copied().collect());
        Ok(c)
    }

    /// Directories (and, for the disk nemesis, the tmpfs) of a node about to start for the
    /// first time.
    fn prepare(&mut self, id: u64, tmpfs_mib: Option<u64>) -> anyhow::Result<()> {
        let dir = self.run_dir.join("nodes").join(format!("n{id}"));
        std::fs::create_dir_all(&dir)?;
        let data_dir = match tmpfs_mib {
            Some(mib) => {
                let mount = self.data_root.join(format!("{TMPFS_MARKER}-n{id}"));
                std::fs::create_dir_all(&mount)?;
                let size = format!("size={mib}m");
                net::sh(
                    "mount",
                    &[
                        "-t",
                        "tmpfs",
                        "-o",
                        &size,
                        "tmpfs",
                        mount.to_str().unwrap_or(""),
                    ],
                )?;
                self.tmpfs.push(mount.clone());
                mount.join("data")
            }
            None => self.data_root.join(format!("n{id}")),
        };
        let clock = if self.clock_files {
            let f = dir.join("faketime");
            std::fs::write(&f, "+0\n")?;
            Clock::OffsetFile(f)
        } else {
            Clock::Real
        };
        self.nodes.insert(
            id,
            NodeProc {
                dir,
                data_dir,
                child: None,
                paused: false,
                clock,
                ready_before: 0,
                starts: 0,
                small_journal: tmpfs_mib.is_some(),
            },
        );
        Ok(())
    }

    fn members_arg(&self) -> String {
        self.members
            .iter()
            .map(|id| format!("{id}@{}:{CLUSTER_PORT}", net::address(*id)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `id`'s process (it must not be running).
    fn spawn(&mut self, id: u64) -> anyhow::Result<()> {
        let members = self.members_arg();
        let lib = self.faketime_lib.clone();
        let bin = self.bins.warren.clone();
        let config = self.config.clone();
        let node = self
            .nodes
            .get_mut(&id)
            .with_context(|| format!("no node {id}"))?;
        if node.child.is_some() {
            bail!("node {id} is already running");
        }
        let stdout_path = node.dir.join("stdout.log");
        node.ready_before = count_ready(&stdout_path);
        let stdout = append(&stdout_path)?;
        let stderr = append(&node.dir.join("warren.log"))?;
        let addr = net::address(id);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net::namespace(id)])
            .arg(&bin)
            .arg("--config")
            .arg(&config)
            .args(["--node-id", &id.to_string()])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--amqp-listen", &format!("{addr}:{AMQP_PORT}")])
            .args(["--http-listen", &format!("{addr}:{HTTP_PORT}")])
            .args(["--cluster-listen", &format!("{addr}:{CLUSTER_PORT}")])
            .args(["--members", &members])
            .args(if node.small_journal {
                &["--journal-bytes", DISK_NODE_JOURNAL][..]
            } else {
                &[][..]
            })
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        match (&node.clock, &lib) {
            (Clock::Real, _) => {}
            (Clock::OffsetFile(f), Some(lib)) => {
                cmd.env("LD_PRELOAD", lib)
                    .env("FAKETIME_TIMESTAMP_FILE", f)
                    .env("FAKETIME_CACHE_DURATION", "1")
                    .env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
            }
            (Clock::Rate(r), Some(lib)) => {
                cmd.env("LD_PRELOAD", lib)
                    .env("FAKETIME", format!("+0 x{r}"))
                    .env("FAKETIME_DONT_FAKE_MONOTONIC", "0");
            }
            (_, None) => bail!("libfaketime is not installed"),
        }
        // `ip netns exec` execs the broker in place, so the child's pid is the broker's.
        let child = cmd.spawn().context("cannot start warren")?;
        node.child = Some(child);
        node.paused = false;
        node.starts += 1;
        Ok(())
    }

    /// Waits until node `id` printed `warren: ready` for its current start.
    pub async fn wait_ready(&mut self, id: u64, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let node = self.nodes.get_mut(&id).context("no such node")?;
            let stdout = node.dir.join("stdout.log");
            if count_ready(&stdout) > node.ready_before {
                return Ok(());
            }
            if let Some(child) = node.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                node.child = None;
                bail!(
                    "node {id} exited ({status}) before it was ready; see {}",
                    node.dir.join("warren.log").display()
                );
            }
            if node.child.is_none() {
                bail!("node {id} is not running");
            }
            if Instant::now() > deadline {
                bail!("node {id} not ready after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self, id: u64) -> Option<i32> {
        self.nodes.get(&id)?.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn signal(&self, id: u64, sig: i32) -> bool {
        match self.pid(id) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            Some(pid) => unsafe { libc::kill(pid, sig) == 0 },
            None => false,
        }
    }

    /// Whether node `id`'s process runs (paused counts as running).
    pub fn running(&mut self, id: u64) -> bool {
        let Some(node) = self.nodes.get_mut(&id) else {
            return false;
        };
        match node.child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(None) => true,
                _ => {
                    node.child = None;
                    false
                }
            },
            None => false,
        }
    }

    pub fn paused(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.paused)
    }

    pub fn pause(&mut self, id: u64) -> bool {
        let ok = self.signal(id, libc::SIGSTOP);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused |= ok;
        }
        ok
    }

    pub fn resume(&mut self, id: u64) -> bool {
        let ok = self.signal(id, libc::SIGCONT);
        if let Some(n) = self.nodes.get_mut(&id) {
            n.paused = false;
        }
        ok
    }

    /// Waits (bounded) for node `id` to exit; true if it did.
    async fn wait_exit(&mut self, id: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if !self.running(id) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        !self.running(id)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill9(&mut self, id: u64) {
        self.resume(id);
        self.signal(id, libc::SIGKILL);
        self.wait_exit(id, Duration::from_secs(10)).await;
    }

    /// SIGTERM, wait for a clean exit, SIGKILL after [`STOP_TIMEOUT`]. Returns whether the
    /// node exited by itself.
    pub async fn stop(&mut self, id: u64) -> bool {
        if !self.running(id) {
            return true;
        }
        self.resume(id);
        self.signal(id, libc::SIGTERM);
        if self.wait_exit(id, STOP_TIMEOUT).await {
            return true;
        }
        self.kill9(id).await;
        false
    }

    /// Starts node `id` again on its data directory and waits until it is ready.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        if self.running(id) {
            self.kill9(id).await;
        }
        self.spawn(id)?;
        self.wait_ready(id, READY_TIMEOUT).await
    }

    /// Changes how node `id`'s clocks are faked from its next start on.
    pub fn set_clock(&mut self, id: u64, clock: Clock) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.clock = clock;
        }
    }

    /// The clock a node normally runs with: the offset file under the clock nemesis,
    /// real clocks otherwise.
    pub fn default_clock(&self, id: u64) -> Clock {
        if self.clock_files {
            Clock::OffsetFile(
                self.run_dir
                    .join("nodes")
                    .join(format!("n{id}"))
                    .join("faketime"),
            )
        } else {
            Clock::Real
        }
    }

    /// Writes a wall-clock offset (seconds) for a node running with an offset file.
    pub fn set_offset(&self, id: u64, seconds: i64) -> anyhow::Result<()> {
        if !self.clock_files {
            return Ok(());
        }
        let f = self
            .run_dir
            .join("nodes")
            .join(format!("n{id}"))
            .join("faketime");
        let spec = if seconds >= 0 {
            format!("+{seconds}s\n")
        } else {
            format!("{seconds}s\n")
        };
        std::fs::write(f, spec)?;
        Ok(())
    }

    pub fn data_dir(&self, id: u64) -> Option<PathBuf> {
        self.nodes.get(&id).map(|n| n.data_dir.clone())
    }

    /// The members as the harness last set them.
    pub fn members(&self) -> Vec<u64> {
        self.members.iter().copied().collect()
    }

    /// Every node the harness started, members or not.
    pub fn all_nodes(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn remove_member(&mut self, id: u64) {
        self.members.remove(&id);
        self.targets.set(self.members());
    }

    /// Creates a fresh node with an id never used before (new namespace, address and
    /// data directory) and starts it with the current member list; it waits to be added
    /// (`warrenctl add-node`), so this does not wait for it to be ready.
    pub fn spawn_new_node(&mut self) -> anyhow::Result<u64> {
        let id = self.next_id;
        if id >= 250 {
            bail!("out of node ids");
        }
        self.next_id += 1;
        self.net.add_host(id)?;
        self.prepare(id, None)?;
        self.spawn(id)?;
        Ok(id)
    }

    /// Records node `id` as a member (after `add-node` succeeded) and lets clients use it.
    pub fn add_member(&mut self, id: u64) {
        self.members.insert(id);
        self.targets.set(self.members());
    }

    pub fn warrenctl(&self) -> &Path {
        &self.bins.warrenctl
    }

    /// Stops every node (SIGTERM, then SIGKILL after a bound), in parallel.
    pub async fn stop_all(&mut self) {
        let ids = self.all_nodes();
        for id in &ids {
            if self.running(*id) {
                self.resume(*id);
                self.signal(*id, libc::SIGTERM);
            }
        }
        for id in ids {
            if !self.wait_exit(id, STOP_TIMEOUT).await {
                self.kill9(id).await;
            }
        }
    }

    /// Kills everything at once and removes the tmpfs mounts and the network.
    pub fn teardown(&mut self) {
        for node in self.nodes.values_mut() {
            if let Some(mut c) = node.child.take() {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGKILL);
                    libc::kill(c.id() as i32, libc::SIGCONT);
                }
                let _ = c.wait();
            }
        }
        for m in std::mem::take(&mut self.tmpfs) {
            let _ = net::sh("umount", &["-l", m.to_str().unwrap_or("")]);
        }
        self.net.teardown();
    }

    /// Each node's log (stderr) lines containing `needle`, by node.
    pub fn grep_logs(&self, needle: &str) -> BTreeMap<u64, Vec<String>> {
        let mut out = BTreeMap::new();
        for (id, n) in &self.nodes {
            let text = std::fs::read_to_string(n.dir.join("warren.log")).unwrap_or_default();
            let hits: Vec<String> = text
                .lines()
                .filter(|l| l.contains(needle))
                .map(str::to_owned)
                .collect();
            if !hits.is_empty() {
                out.insert(*id, hits);
            }
        }
        out
    }

    /// How many times each node was started.
    pub fn starts(&self) -> BTreeMap<u64, u32> {
        self.nodes.iter().map(|(id, n)| (*id, n.starts)).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn append(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

fn count_ready(stdout: &Path) -> usize {
    std::fs::read_to_string(stdout)
        .map(|t| t.lines().filter(|l| l.trim() == "warren: ready").count())
        .unwrap_or(0)
}

pub fn amqp_url(id: u64) -> String {
    format!(
        "amqp://guest:guest@{}:{AMQP_PORT}/%2f?heartbeat=5&connection_timeout=5000",
        net::address(id)
    )
}

pub fn cluster_addr(id: u64) -> String {
    format!("{}:{CLUSTER_PORT}", net::address(id))
}
