//! The nemesis: a seeded schedule of faults (`schedule`, pure and deterministic) and the
//! code that inflicts and heals them on a running cluster (`Nemesis::run`).
//!
//! A seed gives the same list of events every time: when each fault starts, when it heals,
//! and what it targets in relative terms ("the leader of chaos-q2", "the node at position
//! `pick` among the current members"). Which node that is gets resolved when the fault
//! starts, from the cluster's state then, and is written to the history next to the event,
//! so a failing run can be read back and re-run with the same seed (`chaos run --seed S
//! --nemesis N --duration D`). Faults do not overlap; each heals before the next starts, and
//! `heal_all` undoes whatever is left at the end (partitions, pauses, dead nodes, clocks,
//! the full disk).
//!
//! Uses `net.rs` for partitions, `cluster.rs` for processes and clocks, `admin.rs` for
//! leaders and membership changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::admin;
use crate::cluster::{Clock, Cluster};
use crate::history::{History, Op, OpType};

/// The nemeses `chaos run --nemesis` accepts.
pub const NEMESES: &[(&str, &str)] = &[
    ("none", "no faults: the workload alone (baseline)"),
    (
        "partition",
        "network partitions of every shape: random halves, an isolated queue or metadata leader, a majorities ring, a bridge",
    ),
    ("partition-halves", "random halves"),
    (
        "partition-leader",
        "isolate the leader of a queue or of the metadata",
    ),
    (
        "partition-ring",
        "majorities ring: every node sees a majority, no two the same",
    ),
    (
        "partition-bridge",
        "two halves that both see one bridge node",
    ),
    (
        "kill",
        "SIGKILL a node, a queue leader or a minority, restart later",
    ),
    (
        "pause",
        "SIGSTOP a node, a queue leader or a minority, SIGCONT later",
    ),
    (
        "restart",
        "rolling restart: SIGTERM, wait, start, one node at a time",
    ),
    (
        "membership",
        "remove a node and add a fresh one with a new id; grow and shrink queue replica sets",
    ),
    (
        "clock",
        "wall-clock jumps (libfaketime offset file) and drifting clock rates (restart under faketime)",
    ),
    (
        "disk",
        "fill a node's data directory (a small tmpfs) and free it again",
    ),
    (
        "mixed",
        "all of partition, kill, pause, restart and membership, interleaved",
    ),
];

pub fn known(nemesis: &str) -> bool {
    NEMESES.iter().any(|(n, _)| *n == nemesis) || scenario(nemesis).is_some()
}

/// A named scenario: a fixed fault list that reproduced a broker bug, kept as a
/// regression test (`chaos run --nemesis NAME`). Scenarios are not random; the seed only
/// drives the workload.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// Set while the bug is open: the scenario is expected to fail.
    pub known_bug: Option<&'static str>,
    /// Unflagged repeats on the connection that already had the message fail the run
    /// (they are only a warning elsewhere).
    pub strict_duplicates: bool,
    pub events: fn() -> Vec<Event>,
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "remove-consumer-node",
        about: "warrenctl remove-node of node 1, which has consumers of chaos-q2 and chaos-q4 \
                (led elsewhere) with unacked deliveries; then a fresh node 4 is added. Every \
                message those consumers held must come back to the queue.",
        // Fixed: a removed member is released like a down one
        // (cluster_admin::removing_a_node_gives_back_what_its_consumers_held).
        known_bug: None,
        strict_duplicates: false,
        events: || {
            vec![Event {
                at_ms: 6_000,
                hold_ms: 1_000,
                fault: Fault::ReplaceNode {
                    target: Target::Node { pick: 0 },
                },
            }]
        },
    },
    Scenario {
        name: "leader-handback",
        about: "SIGKILL and restart chaos-q2's preferred leader (node 2) three times; each \
                time it comes back it takes the queue's leadership back while publishes \
                through the other nodes are being resent. Each publish must be enqueued once.",
        // Fixed: a new leader no longer carries out the deliveries of entries its
        // predecessor wrote (cluster_admin::acks_during_a_leader_change_are_not_redelivered).
        known_bug: None,
        strict_duplicates: true,
        events: || {
            (0..3)
                .map(|i| Event {
                    at_ms: 4_000 + i * 9_000,
                    hold_ms: 3_000,
                    fault: Fault::Kill {
                        target: Target::Node { pick: 1 },
                    },
                })
                .collect()
        },
    },
];

pub fn scenario(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

/// What a fault targets; resolved against the cluster when the fault starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Target {
    /// The member at position `pick % members` (sorted by id).
    Node { pick: u64 },
    /// The current leader of a queue's group.
    LeaderOf { queue: String },
    /// The metadata group's leader.
    MetadataLeader,
    /// A minority of the members (the largest one), chosen by `pick`.
    Minority { pick: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "shape")]
pub enum Shape {
    /// Members shuffled by `pick`, split in two (the first half the smaller).
    Halves { pick: u64 },
    /// The target alone on one side.
    Isolate { target: Target },
    /// Majorities ring over the members shuffled by `pick`.
    Ring { pick: u64 },
    /// Two halves that cannot talk, and a bridge node that talks to both.
    Bridge { pick: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "fault")]
pub enum Fault {
    Partition {
        shape: Shape,
    },
    Kill {
        target: Target,
    },
    Pause {
        target: Target,
    },
    /// Every member in turn, in the order given by `pick`.
    RollingRestart {
        pick: u64,
    },
    /// `warrenctl remove-node` of the target, stop it, start a node with a new id and a
    /// fresh data directory, `warrenctl add-node` it.
    ReplaceNode {
        target: Target,
    },
    /// `warrenctl add-replica` of the queue on a member that lacks one, or, when every
    /// member has one, `remove-replica` of the replica chosen by `pick` (possibly the
    /// leader); the heal undoes the change.
    GrowShrink {
        queue: String,
        pick: u64,
    },
    /// The target's wall clock jumps by `seconds` (monotonic time untouched).
    ClockJump {
        target: Target,
        seconds: i64,
    },
    /// The target restarts with every clock running at `rate`; the heal restarts it with
    /// real clocks.
    ClockRate {
        target: Target,
        rate: f64,
    },
    /// The node with the tmpfs data directory runs out of space.
    DiskFull,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds after the fault period starts.
    pub at_ms: u64,
    /// How long the fault lasts before it heals.
    pub hold_ms: u64,
    pub fault: Fault,
}

/// The deterministic schedule for `nemesis` and `seed` over `duration`; `queues` are the
/// workload's queue names (targets for leader faults).
pub fn schedule(nemesis: &str, seed: u64, duration: Duration, queues: &[String]) -> Vec<Event> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let total = duration.as_millis() as u64;
    let mut events = Vec::new();
    if nemesis == "none" {
        return events;
    }
    if let Some(sc) = scenario(nemesis) {
        return (sc.events)();
    }
    let mut t = rng.random_range(2_000..5_000);
    // Bounded: every event advances t by at least 3 s.
    while t + 3_000 < total && events.len() < 1_000 {
        let kind = match nemesis {
            "mixed" => {
                ["partition", "kill", "pause", "restart", "membership"][rng.random_range(0..5)]
            }
            n => n,
        };
        let (fault, hold) = fault_for(kind, &mut rng, queues);
        let hold = hold.min(total.saturating_sub(t).max(1_000));
        events.push(Event {
            at_ms: t,
            hold_ms: hold,
            fault,
        });
        t += hold + rng.random_range(2_000..6_000);
    }
    events
}

fn target(rng: &mut ChaCha8Rng, queues: &[String]) -> Target {
    match rng.random_range(0..10) {
        0..4 => Target::Node { pick: rng.random() },
        4..7 => Target::LeaderOf {
            queue: queues[rng.random_range(0..queues.len())].clone(),
        },
        7 => Target::MetadataLeader,
        _ => Target::Minority { pick: rng.random() },
    }
}

fn single_target(rng: &mut ChaCha8Rng, queues: &[String]) -> Target {
    match target(rng, queues) {
        Target::Minority { pick } => Target::Node { pick },
        t => t,
    }
}

fn fault_for(kind: &str, rng: &mut ChaCha8Rng, queues: &[String]) -> (Fault, u64) {
    let hold = rng.random_range(3_000..10_000);
    let shape = |rng: &mut ChaCha8Rng, which: u32| match which {
        0 => Shape::Halves { pick: rng.random() },
        1 => Shape::Isolate {
            target: single_target(rng, queues),
        },
        2 => Shape::Ring { pick: rng.random() },
        _ => Shape::Bridge { pick: rng.random() },
    };
    match kind {
        "partition" => {
            let which = rng.random_range(0..4);
            (
                Fault::Partition {
                    shape: shape(rng, which),
                },
                hold,
            )
        }
        "partition-halves" => (
            Fault::Partition {
                shape: shape(rng, 0),
            },
            hold,
        ),
        "partition-leader" => {
            let target = if rng.random_range(0..4) == 0 {
                Target::MetadataLeader
            } else {
                Target::LeaderOf {
                    queue: queues[rng.random_range(0..queues.len())].clone(),
                }
            };
            (
                Fault::Partition {
                    shape: Shape::Isolate { target },
                },
                hold,
            )
        }
        "partition-ring" => (
            Fault::Partition {
                shape: shape(rng, 2),
            },
            hold,
        ),
        "partition-bridge" => (
            Fault::Partition {
                shape: shape(rng, 3),
            },
            hold,
        ),
        "kill" => (
            Fault::Kill {
                target: target(rng, queues),
            },
            hold,
        ),
        "pause" => (
            Fault::Pause {
                target: target(rng, queues),
            },
            hold,
        ),
        "restart" => (Fault::RollingRestart { pick: rng.random() }, 1_000),
        "membership" => {
            if rng.random_range(0..2) == 0 {
                (
                    Fault::ReplaceNode {
                        target: single_target(rng, queues),
                    },
                    1_000,
                )
            } else {
                (
                    Fault::GrowShrink {
                        queue: queues[rng.random_range(0..queues.len())].clone(),
                        pick: rng.random(),
                    },
                    hold,
                )
            }
        }
        "clock" => {
            if rng.random_range(0..3) < 2 {
                let magnitude = [2i64, 30, 300, 3600, 86_400][rng.random_range(0..5)];
                let sign = if rng.random_range(0..2) == 0 { -1 } else { 1 };
                (
                    Fault::ClockJump {
                        target: target(rng, queues),
                        seconds: sign * magnitude,
                    },
                    hold,
                )
            } else {
                let rate = [0.5, 0.8, 1.25, 2.0][rng.random_range(0..4)];
                (
                    Fault::ClockRate {
                        target: single_target(rng, queues),
                        rate,
                    },
                    hold,
                )
            }
        }
        "disk" => (Fault::DiskFull, hold),
        other => panic!("unknown nemesis {other}"),
    }
}

/// The grudge (who drops whom) of a partition shape over `members`; `isolated` resolves
/// an `Isolate` shape.
pub fn grudge(
    shape: &Shape,
    members: &[u64],
    isolated: Option<&[u64]>,
) -> BTreeMap<u64, BTreeSet<u64>> {
    let mut g: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    let mut cut = |a: u64, b: u64| {
        g.entry(a).or_default().insert(b);
        g.entry(b).or_default().insert(a);
    };
    let shuffled = |pick: u64| {
        let mut m = members.to_vec();
        m.sort_unstable();
        m.shuffle(&mut ChaCha8Rng::seed_from_u64(pick));
        m
    };
    match shape {
        Shape::Halves { pick } => {
            let m = shuffled(*pick);
            let (a, b) = m.split_at(m.len() / 2);
            for x in a {
                for y in b {
                    cut(*x, *y);
                }
            }
        }
        Shape::Isolate { .. } => {
            let iso = isolated.unwrap_or(&[]);
            for x in iso {
                for y in members.iter().filter(|y| !iso.contains(y)) {
                    cut(*x, *y);
                }
            }
        }
        Shape::Ring { pick } => {
            let m = shuffled(*pick);
            let n = m.len();
            if n >= 4 {
                // Each node keeps its neighbours within distance k on the ring: 2k+1 nodes
                // (itself included) are a majority, and no two nodes see the same majority.
                let majority = n / 2 + 1;
                let k = (majority - 1).div_ceil(2);
                for i in 0..n {
                    for j in 0..n {
                        let d = (i + n - j) % n;
                        let d = d.min(n - d);
                        if d > k {
                            g.entry(m[i]).or_default().insert(m[j]);
                        }
                    }
                }
            } else if n == 3 {
                // Three nodes have no ring where each hears a majority but not everyone:
                // one-way drops would not do (TCP needs both directions, so they cut every
                // link). The closest shape cuts one link: the ends hear different majorities
                // through the middle node.
                cut(m[0], m[2]);
            }
        }
        Shape::Bridge { pick } => {
            let m = shuffled(*pick);
            if m.len() >= 3 {
                let bridge = m[m.len() / 2];
                let (a, rest) = m.split_at(m.len() / 2);
                let b = &rest[1..];
                debug_assert_eq!(rest[0], bridge);
                for x in a {
                    for y in b {
                        cut(*x, *y);
                    }
                }
            }
        }
    }
    g
}

/// Runs a schedule against a cluster, recording every step in the history.
pub struct Nemesis {
    pub cluster: Cluster,
    history: Arc<History>,
    /// The node whose data directory is a tmpfs (disk nemesis).
    disk_node: Option<u64>,
    /// Replica changes of a GrowShrink, to undo when it heals: (queue, node, grown).
    grown: Vec<(String, u64, bool)>,
    /// Nodes whose clock rate was changed, to restart with real clocks.
    drifting: BTreeSet<u64>,
    partitioned: bool,
    pub failures: Vec<String>,
}

const PROCESS: &str = "nemesis";

impl Nemesis {
    pub fn new(cluster: Cluster, history: Arc<History>, disk_node: Option<u64>) -> Nemesis {
        Nemesis {
            cluster,
            history,
            disk_node,
            grown: Vec::new(),
            drifting: BTreeSet::new(),
            partitioned: false,
            failures: Vec::new(),
        }
    }

    fn note(&self, kind: OpType, f: &str, value: serde_json::Value) {
        self.history.record(Op::new(PROCESS, kind, f).value(value));
    }

    /// Live members as the cluster sees them: the harness's member list minus killed or
    /// paused nodes.
    fn live_members(&mut self) -> Vec<u64> {
        let members = self.cluster.members();
        members
            .into_iter()
            .filter(|id| self.cluster.running(*id) && !self.cluster.paused(*id))
            .collect()
    }

    async fn resolve(&mut self, target: &Target) -> Vec<u64> {
        let members = self.cluster.members();
        let live = self.live_members();
        match target {
            Target::Node { pick } => vec![members[(*pick % members.len() as u64) as usize]],
            Target::LeaderOf { queue } => match admin::queue_leader(&live, queue).await {
                Some(l) if members.contains(&l) => vec![l],
                _ => vec![members[0]],
            },
            Target::MetadataLeader => match admin::metadata_leader(&live).await {
                Some(l) if members.contains(&l) => vec![l],
                _ => vec![members[0]],
            },
            Target::Minority { pick } => {
                let mut m = members.clone();
                m.shuffle(&mut ChaCha8Rng::seed_from_u64(*pick));
                m.truncate((members.len() - 1) / 2);
                m.sort_unstable();
                m
            }
        }
    }

    /// Runs `events` starting now; returns when the last one has healed. Stops early (after
    /// healing the current fault) once `deadline` passes.
    pub async fn run(&mut self, events: &[Event], deadline: Instant) {
        let start = Instant::now();
        for ev in events {
            let at = start + Duration::from_millis(ev.at_ms);
            // A fault that takes long to inflict (a rolling restart) delays the ones after
            // it; none starts after the fault period.
            if at > deadline || Instant::now() + Duration::from_secs(1) > deadline {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
            let healing = self.inflict(&ev.fault).await;
            let hold_until = Instant::now() + Duration::from_millis(ev.hold_ms);
            tokio::time::sleep_until(hold_until.min(deadline + Duration::from_secs(5)).into())
                .await;
            self.heal(&ev.fault, healing).await;
        }
    }

    /// Starts a fault; returns what the heal needs (the resolved nodes).
    async fn inflict(&mut self, fault: &Fault) -> Vec<u64> {
        let desc = serde_json::to_value(fault).unwrap_or_default();
        self.history
            .record(Op::new(PROCESS, OpType::Invoke, "fault").value(desc.clone()));
        let result: anyhow::Result<(Vec<u64>, serde_json::Value)> = async {
            match fault {
                Fault::Partition { shape } => {
                    let members = self.cluster.members();
                    let isolated = match shape {
                        Shape::Isolate { target } => Some(self.resolve(target).await),
                        _ => None,
                    };
                    let g = grudge(shape, &members, isolated.as_deref());
                    self.cluster.net.partition(&g)?;
                    self.partitioned = true;
                    let shown: BTreeMap<String, &BTreeSet<u64>> =
                        g.iter().map(|(k, v)| (k.to_string(), v)).collect();
                    Ok((
                        isolated.unwrap_or_default(),
                        serde_json::json!({ "drops": shown }),
                    ))
                }
                Fault::Kill { target } => {
                    let nodes = self.resolve(target).await;
                    for n in &nodes {
                        self.cluster.kill9(*n).await;
                    }
                    Ok((nodes.clone(), serde_json::json!({ "killed": nodes })))
                }
                Fault::Pause { target } => {
                    let nodes = self.resolve(target).await;
                    for n in &nodes {
                        self.cluster.pause(*n);
                    }
                    Ok((nodes.clone(), serde_json::json!({ "paused": nodes })))
                }
                Fault::RollingRestart { pick } => {
                    let mut order = self.cluster.members();
                    order.shuffle(&mut ChaCha8Rng::seed_from_u64(*pick));
                    let mut clean = BTreeMap::new();
                    for n in &order {
                        let exited = self.cluster.stop(*n).await;
                        clean.insert(n.to_string(), exited);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        self.cluster.restart(*n).await?;
                        // Give the node's groups a moment to catch up before the next stop.
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    Ok((
                        order.clone(),
                        serde_json::json!({ "order": order, "clean_exit": clean }),
                    ))
                }
                Fault::ReplaceNode { target } => self.replace_node(target).await,
                Fault::GrowShrink { queue, pick } => {
                    let members = self.cluster.members();
                    let live = self.live_members();
                    let status = admin::status(live[0]).await?;
                    let replicas = status
                        .queue(queue)
                        .map(|g| g.replicas.clone())
                        .unwrap_or_default();
                    // Grow onto a member without a replica if there is one, else shrink
                    // (possibly removing the leader); the heal undoes it.
                    let spare = members.iter().find(|m| !replicas.contains(m)).copied();
                    let (verb, node) = match spare {
                        Some(n) => ("add-replica", n),
                        None if replicas.len() > 1 => (
                            "remove-replica",
                            replicas[(*pick % replicas.len() as u64) as usize],
                        ),
                        None => {
                            return Ok((
                                vec![],
                                serde_json::json!({ "skipped": "one replica, no spare member" }),
                            ));
                        }
                    };
                    let out = admin::warrenctl(
                        self.cluster.warrenctl(),
                        live[0],
                        &[verb.into(), queue.clone(), node.to_string()],
                        Duration::from_secs(30),
                    )
                    .await?;
                    self.grown.push((queue.clone(), node, verb == "add-replica"));
                    Ok((
                        vec![node],
                        serde_json::json!({ verb: node, "replicas_before": replicas, "warrenctl": out }),
                    ))
                }
                Fault::ClockJump { target, seconds } => {
                    let nodes = self.resolve(target).await;
                    for n in &nodes {
                        self.cluster.set_offset(*n, *seconds)?;
                    }
                    Ok((nodes.clone(), serde_json::json!({ "nodes": nodes, "seconds": seconds })))
                }
                Fault::ClockRate { target, rate } => {
                    let nodes = self.resolve(target).await;
                    for n in &nodes {
                        self.cluster.stop(*n).await;
                        self.cluster.set_clock(*n, Clock::Rate(*rate));
                        self.drifting.insert(*n);
                        self.cluster.restart(*n).await?;
                    }
                    Ok((nodes.clone(), serde_json::json!({ "nodes": nodes, "rate": rate })))
                }
                Fault::DiskFull => {
                    let Some(n) = self.disk_node else {
                        return Ok((vec![], serde_json::json!({ "skipped": "no tmpfs node" })));
                    };
                    let filled = fill_disk(&self.cluster, n)?;
                    Ok((vec![n], serde_json::json!({ "node": n, "filler_bytes": filled })))
                }
            }
        }
        .await;
        match result {
            Ok((nodes, detail)) => {
                self.note(
                    OpType::Ok,
                    "fault",
                    serde_json::json!({ "fault": desc, "resolved": detail }),
                );
                nodes
            }
            Err(e) => {
                let why = format!("{e:#}");
                self.failures.push(format!("fault {desc}: {why}"));
                self.note(
                    OpType::Info,
                    "fault",
                    serde_json::json!({ "fault": desc, "error": why }),
                );
                Vec::new()
            }
        }
    }

    async fn replace_node(
        &mut self,
        target: &Target,
    ) -> anyhow::Result<(Vec<u64>, serde_json::Value)> {
        let old = self.resolve(target).await[0];
        let live = self.live_members();
        let via = *live
            .iter()
            .find(|n| **n != old)
            .ok_or_else(|| anyhow::anyhow!("no live member besides {old}"))?;
        let out = admin::warrenctl(
            self.cluster.warrenctl(),
            via,
            &["remove-node".into(), old.to_string()],
            Duration::from_secs(60),
        )
        .await?;
        self.cluster.remove_member(old);
        // The removed node is shut down as an operator would; its data directory stays.
        self.cluster.stop(old).await;
        let new = self.cluster.spawn_new_node()?;
        let addr = crate::cluster::cluster_addr(new);
        let add = admin::warrenctl(
            self.cluster.warrenctl(),
            via,
            &["add-node".into(), new.to_string(), addr],
            Duration::from_secs(90),
        )
        .await;
        let add = match add {
            Ok(o) => o,
            Err(e) => {
                // Leave the new node out of the clients' list; it is not a member.
                return Err(e.context(format!("removed {old}, adding {new} failed")));
            }
        };
        self.cluster
            .wait_ready(new, crate::cluster::READY_TIMEOUT)
            .await?;
        self.cluster.add_member(new);
        Ok((
            vec![old, new],
            serde_json::json!({ "removed": old, "added": new, "remove": out, "add": add }),
        ))
    }

    async fn heal(&mut self, fault: &Fault, nodes: Vec<u64>) {
        let desc = serde_json::to_value(fault).unwrap_or_default();
        let result: anyhow::Result<serde_json::Value> = async {
            match fault {
                Fault::Partition { .. } => {
                    self.cluster.net.heal()?;
                    self.partitioned = false;
                    Ok(serde_json::json!("healed"))
                }
                Fault::Kill { .. } => {
                    for n in &nodes {
                        self.cluster.restart(*n).await?;
                    }
                    Ok(serde_json::json!({ "restarted": nodes }))
                }
                Fault::Pause { .. } => {
                    for n in &nodes {
                        self.cluster.resume(*n);
                    }
                    Ok(serde_json::json!({ "resumed": nodes }))
                }
                Fault::RollingRestart { .. } | Fault::ReplaceNode { .. } => {
                    Ok(serde_json::json!("nothing to heal"))
                }
                Fault::GrowShrink { queue, .. } => {
                    let Some(i) = self.grown.iter().position(|(q, _, _)| q == queue) else {
                        return Ok(serde_json::json!({ "skipped": "nothing changed" }));
                    };
                    let (_, node, grew) = self.grown.remove(i);
                    let live = self.live_members();
                    // Undo: shrink what grew, grow back what shrank (if still a member).
                    let verb = if grew {
                        "remove-replica"
                    } else {
                        "add-replica"
                    };
                    if !grew && !self.cluster.members().contains(&node) {
                        return Ok(serde_json::json!({ "skipped": "node no longer a member" }));
                    }
                    let out = admin::warrenctl(
                        self.cluster.warrenctl(),
                        live[0],
                        &[verb.into(), queue.clone(), node.to_string()],
                        Duration::from_secs(30),
                    )
                    .await?;
                    Ok(serde_json::json!({ verb: node, "warrenctl": out }))
                }
                Fault::ClockJump { .. } => {
                    for n in &nodes {
                        self.cluster.set_offset(*n, 0)?;
                    }
                    Ok(serde_json::json!({ "reset": nodes }))
                }
                Fault::ClockRate { .. } => {
                    for n in &nodes {
                        self.restore_clock(*n).await?;
                    }
                    Ok(serde_json::json!({ "restarted": nodes }))
                }
                Fault::DiskFull => {
                    let mut restarted = Vec::new();
                    for n in &nodes {
                        free_disk(&self.cluster, *n)?;
                        if !self.cluster.running(*n) {
                            self.cluster.restart(*n).await?;
                            restarted.push(*n);
                        }
                    }
                    Ok(serde_json::json!({ "freed": nodes, "restarted_after_exit": restarted }))
                }
            }
        }
        .await;
        match result {
            Ok(detail) => self.note(
                OpType::Ok,
                "heal",
                serde_json::json!({ "fault": desc, "result": detail }),
            ),
            Err(e) => {
                let why = format!("{e:#}");
                self.failures.push(format!("heal {desc}: {why}"));
                self.note(
                    OpType::Info,
                    "heal",
                    serde_json::json!({ "fault": desc, "error": why }),
                );
            }
        }
    }

    async fn restore_clock(&mut self, n: u64) -> anyhow::Result<()> {
        self.drifting.remove(&n);
        self.cluster.stop(n).await;
        let normal = self.cluster.default_clock(n);
        self.cluster.set_clock(n, normal);
        self.cluster.restart(n).await
    }

    /// Undoes everything: partitions, pauses, clocks, the full disk; restarts every member
    /// that is not running. Records what it did.
    pub async fn heal_all(&mut self) {
        let mut did = Vec::new();
        if self.cluster.net.heal().is_ok() && self.partitioned {
            did.push("partition healed".to_owned());
        }
        self.partitioned = false;
        for n in self.cluster.all_nodes() {
            if self.cluster.paused(n) {
                self.cluster.resume(n);
                did.push(format!("resumed {n}"));
            }
        }
        for n in std::mem::take(&mut self.drifting) {
            if let Err(e) = self.restore_clock(n).await {
                self.failures.push(format!("restore clock of {n}: {e:#}"));
            }
            did.push(format!("clock of {n} restored"));
        }
        for n in self.cluster.members() {
            let _ = self.cluster.set_offset(n, 0);
        }
        if let Some(n) = self.disk_node {
            let _ = free_disk(&self.cluster, n);
        }
        for n in self.cluster.members() {
            if !self.cluster.running(n) {
                match self.cluster.restart(n).await {
                    Ok(()) => did.push(format!("restarted {n}")),
                    Err(e) => self.failures.push(format!("restart {n} at heal: {e:#}")),
                }
            }
        }
        self.note(OpType::Ok, "heal-all", serde_json::json!(did));
    }
}

const FILLER: &str = "chaos-filler";

/// Fills the tmpfs holding node `n`'s data directory; returns the bytes written. Bounded
/// by the tmpfs size (the write stops at ENOSPC).
fn fill_disk(cluster: &Cluster, n: u64) -> anyhow::Result<u64> {
    use std::io::Write;
    let dir = cluster
        .data_dir(n)
        .ok_or_else(|| anyhow::anyhow!("no node {n}"))?;
    let mount = dir.parent().unwrap_or(&dir).to_path_buf();
    let path = mount.join(FILLER);
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0u8; 1 << 20];
    let mut written = 0u64;
    // At most 4 GiB, far above any tmpfs the harness makes.
    for _ in 0..4096 {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(k) => written += k as u64,
            Err(_) => break,
        }
    }
    // Fill the last partial megabyte too.
    for _ in 0..1024 {
        match f.write(&chunk[..1024]) {
            Ok(0) | Err(_) => break,
            Ok(k) => written += k as u64,
        }
    }
    let _ = f.flush();
    Ok(written)
}

fn free_disk(cluster: &Cluster, n: u64) -> anyhow::Result<()> {
    let dir = cluster
        .data_dir(n)
        .ok_or_else(|| anyhow::anyhow!("no node {n}"))?;
    let mount = dir.parent().unwrap_or(&dir).to_path_buf();
    let path = mount.join(FILLER);
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues() -> Vec<String> {
        (1..=4).map(|i| format!("chaos-q{i}")).collect()
    }

    #[test]
    fn a_seed_gives_the_same_schedule_every_time() {
        for nemesis in NEMESES.iter().map(|(n, _)| *n) {
            let a = schedule(nemesis, 7, Duration::from_secs(60), &queues());
            let b = schedule(nemesis, 7, Duration::from_secs(60), &queues());
            assert_eq!(a, b, "{nemesis}");
            if nemesis != "none" {
                assert!(!a.is_empty(), "{nemesis} schedules nothing");
            }
            for w in a.windows(2) {
                assert!(w[0].at_ms + w[0].hold_ms < w[1].at_ms, "{nemesis}: overlap");
            }
            assert!(a.iter().all(|e| e.at_ms < 60_000));
        }
        let a = schedule("partition", 7, Duration::from_secs(60), &queues());
        let c = schedule("partition", 8, Duration::from_secs(60), &queues());
        assert_ne!(a, c);
    }

    #[test]
    fn scenarios_are_runnable_by_name() {
        for sc in SCENARIOS {
            assert!(known(sc.name));
            let events = schedule(sc.name, 1, Duration::from_secs(40), &queues());
            assert!(!events.is_empty(), "{}", sc.name);
            assert!(events.iter().all(|e| e.at_ms + e.hold_ms < 40_000));
        }
    }

    #[test]
    fn halves_cut_every_link_across() {
        let g = grudge(&Shape::Halves { pick: 3 }, &[1, 2, 3, 4, 5], None);
        let small: Vec<u64> = g
            .iter()
            .filter(|(_, v)| v.len() == 3)
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(small.len(), 2, "{g:?}");
        for (k, v) in &g {
            for x in v {
                assert!(g[x].contains(k), "cuts are symmetric");
            }
        }
    }

    #[test]
    fn rings_leave_every_node_a_different_majority() {
        for members in [vec![1, 2, 3], vec![1, 2, 3, 4, 5]] {
            let n = members.len();
            let g = grudge(&Shape::Ring { pick: 11 }, &members, None);
            let mut seen = BTreeSet::new();
            for m in &members {
                let hears: BTreeSet<u64> = members
                    .iter()
                    .filter(|x| !g.get(m).is_some_and(|d| d.contains(x)))
                    .copied()
                    .collect();
                assert!(hears.len() > n / 2, "{m} hears {hears:?}");
                if n > 3 {
                    assert!(hears.len() < n, "{m} hears everyone");
                }
                seen.insert(hears);
            }
            // No two nodes hear the same set.
            assert_eq!(seen.len(), n);
        }
    }

    #[test]
    fn a_bridge_node_hears_both_sides() {
        let members = [1, 2, 3, 4, 5];
        let g = grudge(&Shape::Bridge { pick: 5 }, &members, None);
        let bridges: Vec<u64> = members
            .iter()
            .filter(|m| !g.contains_key(m))
            .copied()
            .collect();
        assert_eq!(bridges.len(), 1);
        assert_eq!(g.len(), 4);
        let g3 = grudge(&Shape::Bridge { pick: 5 }, &[1, 2, 3], None);
        assert_eq!(g3.len(), 2);
    }

    #[test]
    fn isolation_cuts_the_target_from_everyone() {
        let g = grudge(
            &Shape::Isolate {
                target: Target::MetadataLeader,
            },
            &[1, 2, 3],
            Some(&[2]),
        );
        assert_eq!(g[&2], BTreeSet::from([1, 3]));
        assert_eq!(g[&1], BTreeSet::from([2]));
    }
}
