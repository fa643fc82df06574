//! One chaos run from start to verdict, and the files it leaves in its directory.
//!
//! Phases: start the cluster in namespaces (`cluster.rs`, `net.rs`), declare the topology
//! and start the workload (`workload.rs`), run the nemesis schedule for the fault period
//! (`nemesis.rs`), heal everything, let the workload run through a quiet period, stop
//! publishing, drain every queue with acks only, stop consuming, then check: the history
//! (`checker.rs`), the nodes' agreement on the metadata (`admin.rs` and passive declares),
//! panics in the node logs, and that publishes were confirmed again after the heal.
//!
//! The run directory holds `run.json` (parameters and the command that repeats the run),
//! `schedule.json`, `history.jsonl`, `nodes/n<i>/{stdout,warren}.log`, `final-status.json`,
//! `summary.json` and `summary.txt`. Data directories live under `data/` and are removed
//! after a passing run unless `--keep-data`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::admin;
use crate::checker::{self, CheckResult};
use crate::cluster::{Binaries, Cluster, ClusterOptions};
use crate::history::{self, History, Op, OpType};
use crate::nemesis::{self, Nemesis};
use crate::workload::{self, Workload, WorkloadOptions};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub seed: u64,
    pub nemesis: String,
    /// The fault period.
    pub duration: Duration,
    pub nodes: usize,
    pub queues: usize,
    pub producers: u32,
    /// Transactional producers, beside the confirming ones.
    pub tx_producers: u32,
    pub consumers_per_queue: u32,
    pub rate: f64,
    /// Workload only, after the heal, before the drain.
    pub quiet: Duration,
    /// Upper bound for the drain.
    pub drain_timeout: Duration,
    pub out: PathBuf,
    pub bins: Binaries,
    pub keep_data: bool,
}

impl RunOptions {
    /// The command line that repeats this run.
    pub fn command(&self) -> String {
        format!(
            "chaos run --seed {} --nemesis {} --duration {} --nodes {} --queues {} \
             --producers {} --tx-producers {} --consumers {} --rate {}",
            self.seed,
            self.nemesis,
            self.duration.as_secs(),
            self.nodes,
            self.queues,
            self.producers,
            self.tx_producers,
            self.consumers_per_queue,
            self.rate
        )
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub verdict: String,
    pub seed: u64,
    pub nemesis: String,
    pub nodes: usize,
    pub duration_s: u64,
    pub run_dir: String,
    pub command: String,
    pub git: String,
    /// Reasons the run failed (empty when it passed).
    pub problems: Vec<String>,
    /// Worth a look, not a failure.
    pub warnings: Vec<String>,
    pub checker: CheckResult,
    pub metadata_agree: bool,
    pub topology_visible_everywhere: bool,
    pub panics: BTreeMap<u64, Vec<String>>,
    pub drained: bool,
    pub drain_ms: u64,
    pub confirms_after_heal: usize,
    pub nemesis_failures: Vec<String>,
    pub idle_reconnects: u64,
    pub node_starts: BTreeMap<u64, u32>,
    pub final_members: Vec<u64>,
    pub elapsed_s: u64,
}

fn git_describe() -> String {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => "unknown".to_owned(),
    }
}

/// Size and modification time of a binary, to tell builds apart when the working tree's
/// revision (`git describe --dirty`) does not.
fn binary_stamp(path: &Path) -> String {
    match std::fs::metadata(path) {
        Ok(m) => {
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            format!("{} bytes, modified at unix {mtime}", m.len())
        }
        Err(e) => format!("unreadable: {e}"),
    }
}

/// Performs a run; returns its summary (also written to the run directory). Errors are
/// harness failures (the cluster could not be started, the topology not declared).
pub async fn run(opts: &RunOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir = opts.out.join(format!(
        "{}-n{}-s{}-{stamp}",
        opts.nemesis, opts.nodes, opts.seed
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let top = workload::topology(opts.queues);
    let schedule = nemesis::schedule(&opts.nemesis, opts.seed, opts.duration, &top.queues);
    let git = git_describe();
    std::fs::write(
        dir.join("run.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "seed": opts.seed,
            "nemesis": opts.nemesis,
            "duration_s": opts.duration.as_secs(),
            "nodes": opts.nodes,
            "queues": top.queues,
            "producers": opts.producers,
            "tx_producers": opts.tx_producers,
            "consumers_per_queue": opts.consumers_per_queue,
            "rate": opts.rate,
            "quiet_s": opts.quiet.as_secs(),
            "git": git,
            "warren": opts.bins.warren,
            "warren_build": binary_stamp(&opts.bins.warren),
            "command": opts.command(),
        }))?,
    )?;
    std::fs::write(
        dir.join("schedule.json"),
        serde_json::to_string_pretty(&schedule)?,
    )?;
    println!("chaos: run {} -> {}", opts.command(), dir.display());

    let history = Arc::new(History::create(&dir.join("history.jsonl"), started)?);
    let data_root = dir.join("data");
    let disk_node = (opts.nemesis == "disk").then(|| 1 + opts.seed % opts.nodes as u64);
    let cluster = Cluster::start(ClusterOptions {
        size: opts.nodes,
        bins: opts.bins.clone(),
        run_dir: dir.clone(),
        data_root: data_root.clone(),
        clock_files: opts.nemesis == "clock",
        tmpfs: disk_node.map(|n| (n, 160)),
    })
    .await
    .context("starting the cluster")?;
    history.record(
        Op::new("setup", OpType::Ok, "cluster-ready")
            .value(serde_json::json!({ "nodes": cluster.members(), "ms": started.elapsed().as_millis() as u64 })),
    );
    let targets = cluster.targets.clone();
    let members = cluster.members();
    workload::declare(&top, &members, &history)
        .await
        .context("declaring the topology")?;
    let mut load = Workload::start(
        &WorkloadOptions {
            producers: opts.producers,
            tx_producers: opts.tx_producers,
            consumers_per_queue: opts.consumers_per_queue,
            rate: opts.rate,
            seed: opts.seed,
            run_tag: format!("s{}", opts.seed),
        },
        &top,
        targets,
        history.clone(),
    );
    // Let every client connect before the first fault.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut nem = Nemesis::new(cluster, history.clone(), disk_node);
    history.record(Op::new("nemesis", OpType::Info, "start").value(opts.nemesis.clone()));
    let deadline = Instant::now() + opts.duration;
    nem.run(&schedule, deadline).await;
    if Instant::now() < deadline {
        tokio::time::sleep_until(deadline.into()).await;
    }
    nem.heal_all().await;
    let healed_ms = history.now_ms();
    println!("chaos: healed; quiet for {}s", opts.quiet.as_secs());
    tokio::time::sleep(opts.quiet).await;

    load.stop_producers().await;
    load.drain_mode();
    history.record(Op::new("setup", OpType::Info, "drain").value("start"));
    let drain_start = Instant::now();
    let drained = drain(&mut nem, &load, &top, opts.drain_timeout).await;
    let drain_ms = drain_start.elapsed().as_millis() as u64;
    history.record(
        Op::new("setup", OpType::Info, "drain")
            .value(serde_json::json!({ "drained": drained, "ms": drain_ms })),
    );
    load.stop_consumers().await;
    history.flush();

    // Cluster-level checks.
    let final_members = nem.cluster.members();
    let (metadata_agree, views) = metadata_agreement(&final_members).await;
    std::fs::write(
        dir.join("final-status.json"),
        serde_json::to_string_pretty(&views)?,
    )?;
    let mut topology_ok = true;
    let mut warnings = Vec::new();
    for n in &final_members {
        if let Err(e) = workload::verify_topology(&top, *n).await {
            topology_ok = false;
            warnings.push(format!("node {n}: topology not visible over AMQP: {e:#}"));
        }
    }
    nem.cluster.stop_all().await;
    let panics = nem.cluster.grep_logs("panicked");
    // A C-level abort (a RocksDB assertion) is not a Rust panic; it is reported apart.
    let aborts = nem.cluster.grep_logs("Assertion");
    let node_starts = nem.cluster.starts();
    let nemesis_failures = nem.failures.clone();
    drop(nem);
    history.flush();

    let ops = history::read(&dir.join("history.jsonl"))?;
    let result = checker::check(&ops);
    let confirms_after_heal = ops
        .iter()
        .filter(|o| o.f == "publish" && o.kind == Some(OpType::Ok) && o.time_ms >= healed_ms)
        .count();

    let mut problems = Vec::new();
    if result.lost > 0 {
        problems.push(format!(
            "{} confirmed (message, queue) pairs lost ({} never delivered, {} requeued and never back)",
            result.lost, result.lost_never_delivered, result.lost_after_requeue
        ));
    }
    if result.unexpected > 0 {
        problems.push(format!("{} unexpected deliveries", result.unexpected));
    }
    if result.order_violations > 0 {
        problems.push(format!(
            "{} order violations among first deliveries",
            result.order_violations
        ));
    }
    if result.tx_partial > 0 {
        problems.push(format!(
            "{} transactions took effect in part",
            result.tx_partial
        ));
    }
    if nemesis::scenario(&opts.nemesis).is_some_and(|sc| sc.strict_duplicates)
        && result.duplicates_unflagged_same_session > 0
    {
        problems.push(format!(
            "{} messages delivered twice on one connection without the redelivered flag",
            result.duplicates_unflagged_same_session
        ));
    }
    if !metadata_agree {
        problems.push("nodes disagree on the metadata (see final-status.json)".to_owned());
    }
    if !topology_ok {
        problems.push("a node does not serve the declared topology".to_owned());
    }
    if !panics.is_empty() {
        problems.push(format!("panics in the logs of nodes {:?}", panics.keys()));
    }
    if result.publishes_ok == 0 {
        problems.push("no publish was confirmed at all".to_owned());
    }
    if confirms_after_heal == 0 {
        problems.push("no publish was confirmed after the faults healed".to_owned());
    }
    for (n, lines) in &aborts {
        warnings.push(format!(
            "node {n} aborted {} time(s): {}",
            lines.len(),
            lines[0].chars().take(200).collect::<String>()
        ));
    }
    if !drained {
        warnings.push(format!(
            "queues not empty after {}s of draining",
            opts.drain_timeout.as_secs()
        ));
    }
    if result.publishes_returned > 0 {
        warnings.push(format!(
            "{} publishes returned as unroutable (the topology never changes)",
            result.publishes_returned
        ));
    }
    if result.duplicates_unflagged > 0 {
        warnings.push(format!(
            "{} repeated deliveries without the redelivered flag ({} on the connection that had the message already)",
            result.duplicates_unflagged, result.duplicates_unflagged_same_session
        ));
    }
    for f in &nemesis_failures {
        warnings.push(format!("nemesis: {f}"));
    }
    let idle_reconnects = load.idle_reconnects();
    if idle_reconnects > 0 {
        // Not a failure: a fault may keep a queue from its consumer that long. But it is how
        // a consumer left waiting for deliveries that never come shows (one released by a
        // leader that did not tell its node did, before 5bb6ff5).
        warnings.push(format!(
            "{idle_reconnects} consumer(s) got nothing for {:?} and reconnected",
            crate::workload::IDLE_RECONNECT
        ));
    }
    let verdict = if problems.is_empty() { "pass" } else { "fail" };
    let summary = Summary {
        verdict: verdict.to_owned(),
        seed: opts.seed,
        nemesis: opts.nemesis.clone(),
        nodes: opts.nodes,
        duration_s: opts.duration.as_secs(),
        run_dir: dir.display().to_string(),
        command: opts.command(),
        git,
        problems,
        warnings,
        checker: result,
        metadata_agree,
        topology_visible_everywhere: topology_ok,
        panics,
        drained,
        drain_ms,
        confirms_after_heal,
        nemesis_failures,
        idle_reconnects,
        node_starts,
        final_members,
        elapsed_s: started.elapsed().as_secs(),
    };
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    std::fs::write(dir.join("summary.txt"), text_summary(&summary, &schedule))?;
    if summary.verdict == "pass" && !opts.keep_data {
        let _ = std::fs::remove_dir_all(&data_root);
    }
    Ok(summary)
}

/// Waits until every queue is empty (ready and unacked, on every member that answers) and
/// no delivery arrived for a few seconds, or the bound passes.
async fn drain(
    nem: &mut Nemesis,
    load: &Workload,
    top: &workload::Topology,
    limit: Duration,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if load.quiet_for_ms() < 3_000 {
            continue;
        }
        let mut empty = true;
        let mut answered = 0;
        for n in nem.cluster.members() {
            let Ok(s) = admin::status(n).await else {
                continue;
            };
            answered += 1;
            for q in &top.queues {
                match s.queue(q) {
                    Some(g) if g.ready == 0 && g.unacked == 0 => {}
                    _ => empty = false,
                }
            }
        }
        if empty && answered > 0 {
            return true;
        }
    }
    false
}

/// Compares the members' views of the metadata (members, voters, groups and replica
/// sets), retrying for a while since followers apply a moment later. Returns whether they
/// agree and every node's status.
async fn metadata_agreement(members: &[u64]) -> (bool, serde_json::Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        let mut views = BTreeMap::new();
        let mut statuses = BTreeMap::new();
        for n in members {
            if let Ok(s) = admin::status(*n).await {
                views.insert(*n, admin::metadata_view(&s));
                statuses.insert(n.to_string(), s);
            }
        }
        let all = views.len() == members.len();
        let first = views.values().next().cloned();
        let agree = all && views.values().all(|v| Some(v) == first.as_ref());
        // And the member list is the one the harness built.
        let expected: Vec<String> = members.iter().map(|m| m.to_string()).collect();
        let members_match = first
            .as_ref()
            .and_then(|v| v.get("members"))
            .and_then(|m| m.as_object())
            .map(|m| m.keys().cloned().collect::<Vec<_>>() == expected)
            .unwrap_or(false);
        last = serde_json::json!({ "agree": agree, "members_match": members_match, "statuses": statuses });
        if agree && members_match {
            return (true, last);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    (false, last)
}

pub fn text_summary(s: &Summary, schedule: &[nemesis::Event]) -> String {
    let c = &s.checker;
    let mut t = String::new();
    let _ = writeln!(
        t,
        "verdict: {}   nemesis {}  seed {}  nodes {}  faults {}s  ({}s in all)",
        s.verdict.to_uppercase(),
        s.nemesis,
        s.seed,
        s.nodes,
        s.duration_s,
        s.elapsed_s
    );
    let _ = writeln!(t, "repeat:  {}", s.command);
    let _ = writeln!(t, "build:   {}", s.git);
    for p in &s.problems {
        let _ = writeln!(t, "PROBLEM: {p}");
    }
    for w in &s.warnings {
        let _ = writeln!(t, "warning: {w}");
    }
    let _ = writeln!(
        t,
        "publishes: {} invoked, {} confirmed, {} nacked, {} returned, {} unknown ({} of them delivered)",
        c.publishes_invoked,
        c.publishes_ok,
        c.publishes_nacked,
        c.publishes_returned,
        c.publishes_info,
        c.info_delivered
    );
    let _ = writeln!(
        t,
        "deliveries: {} ({} distinct message-queue pairs of {} expected), acks {}, requeues {}",
        c.deliveries, c.distinct_delivered_pairs, c.expected_pairs, c.acks_sent, c.requeues_sent
    );
    let _ = writeln!(
        t,
        "transactions: {} committed, unknown outcome: {} applied, {} dropped; partial: {}",
        c.tx_committed, c.tx_unknown_applied, c.tx_unknown_dropped, c.tx_partial
    );
    for e in &c.tx_partial_examples {
        let _ = writeln!(t, "  partial transaction: {e}");
    }
    let _ = writeln!(
        t,
        "lost: {}   unexpected: {}   order violations: {}",
        c.lost, c.unexpected, c.order_violations
    );
    let _ = writeln!(
        t,
        "duplicates: {} ({} flagged redelivered, {} after an ack, {} unflagged, {} of them on the same connection)",
        c.duplicates,
        c.duplicates_redelivered_flag,
        c.duplicates_after_ack,
        c.duplicates_unflagged,
        c.duplicates_unflagged_same_session
    );
    let _ = writeln!(
        t,
        "metadata agree: {}   drained: {} in {} ms   confirms after heal: {}   idle reconnects: {}",
        s.metadata_agree, s.drained, s.drain_ms, s.confirms_after_heal, s.idle_reconnects
    );
    let _ = writeln!(
        t,
        "final members: {:?}   starts per node: {:?}",
        s.final_members, s.node_starts
    );
    for l in &c.lost_examples {
        let _ = writeln!(
            t,
            "  lost {} in {} (published via node {:?} at {} ms, confirmed at {:?} ms, {} deliveries)",
            l.msg, l.queue, l.node, l.invoked_ms, l.confirmed_ms, l.deliveries
        );
    }
    for u in &c.unexpected_examples {
        let _ = writeln!(t, "  unexpected {u}");
    }
    for o in &c.order_examples {
        let _ = writeln!(t, "  order {o:?}");
    }
    for u in &c.unflagged_examples {
        let _ = writeln!(t, "  unflagged repeat {u}");
    }
    for (n, lines) in &s.panics {
        for l in lines.iter().take(5) {
            let _ = writeln!(t, "  panic on node {n}: {l}");
        }
    }
    let _ = writeln!(t, "schedule:");
    for e in schedule {
        let _ = writeln!(
            t,
            "  at {:>6} ms for {:>5} ms: {}",
            e.at_ms,
            e.hold_ms,
            serde_json::to_string(&e.fault).unwrap_or_default()
        );
    }
    t
}

/// Re-checks a stored run's history (`chaos check DIR`); prints the checker's counts.
pub fn recheck(dir: &Path) -> anyhow::Result<CheckResult> {
    let ops = history::read(&dir.join("history.jsonl"))?;
    Ok(checker::check(&ops))
}
