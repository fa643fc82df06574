//! The admin gRPC service `warrenctl` talks to: cluster status (members, liveness, every
//! group's leader, replicas and lag), adding and removing nodes, growing and shrinking a
//! queue's replica set, and rebalancing queue leaders.
//!
//! Membership of the metadata group changes only on its leader; a call that reaches another
//! node is answered with the leader's address (`FailedPrecondition`), which `warrenctl`
//! follows. Queue replica sets are metadata (`MetaCmd::SetReplicas`); each queue's group then
//! converges to its set (`supervisor::reconcile`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ServerState};
use tonic::{Request, Response, Status};
use warren_core::NodeId;
use warren_core::meta::{MetaCmd, MetaReply, Placement};
use warren_proto as pb;

use crate::node::{Node, NodeSlot};

pub struct AdminService(Arc<NodeSlot>);

impl AdminService {
    pub fn server(slot: Arc<NodeSlot>) -> pb::admin_server::AdminServer<AdminService> {
        pb::admin_server::AdminServer::new(AdminService(slot))
    }

    fn node(&self) -> Result<Arc<Node>, Status> {
        self.0
            .get()
            .ok_or_else(|| Status::unavailable("node is starting or stopping"))
    }
}

/// A salt for a new password hash; not secret, only different per user.
fn rand_salt() -> [u8; 4] {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let v = h.finish().to_le_bytes();
    [v[0], v[1], v[2], v[3]]
}

/// Permissions are regular expressions; a broken one is refused here rather than locking
/// the user out at every connection.
fn check_expression(what: &str, expr: &str) -> Result<(), Status> {
    if expr.is_empty() {
        return Ok(());
    }
    regex::Regex::new(expr)
        .map(|_| ())
        .map_err(|e| Status::invalid_argument(format!("invalid {what} permission '{expr}': {e}")))
}

/// A policy definition from its JSON object.
fn definition_table(json: &str) -> Result<warren_codec::FieldTable, Status> {
    let bad = |why: String| Status::invalid_argument(format!("invalid policy definition: {why}"));
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    warren_core::json::table_from_json(&value).map_err(bad)
}

fn definition_json(table: &warren_codec::FieldTable) -> String {
    warren_core::json::table_to_json(table).to_string()
}

/// How long remove-node waits for the replica moves it started.
const MOVES_CONVERGE: std::time::Duration = std::time::Duration::from_secs(60);

impl Node {
    /// Waits until no queue group counts `gone` among its voters any more, as each group's
    /// leader sees it (asked through its replicas); returns how many still did at the end.
    pub(crate) async fn wait_moves_converged(
        &self,
        gone: NodeId,
        limit: std::time::Duration,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut pending = 0;
            for h in self.queue_handles() {
                let Placement::Replicated { group, replicas } = h.def().placement else {
                    continue;
                };
                if !self.group_left(group, &replicas, gone).await {
                    pending += 1;
                }
            }
            if pending == 0 || tokio::time::Instant::now() >= deadline {
                return pending;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    /// Whether the group's leader (found among its replicas) no longer has `gone` as voter.
    pub(crate) async fn group_left(&self, group: u64, replicas: &[NodeId], gone: NodeId) -> bool {
        for n in replicas.iter().copied().filter(|n| *n != gone) {
            let view = if n == self.id() {
                self.group_voters(group)
            } else {
                match self
                    .transport()
                    .call(
                        n,
                        crate::transport::PeerRequest::GroupVoters { group },
                        std::time::Duration::from_secs(2),
                    )
                    .await
                {
                    Ok(crate::transport::PeerResponse::GroupVoters(v)) => v,
                    _ => None,
                }
            };
            if let Some((true, voters)) = view {
                return !voters.contains(&gone);
            }
        }
        false
    }
}

fn reply(message: impl Into<String>) -> Result<Response<pb::AdminReply>, Status> {
    Ok(Response::new(pb::AdminReply {
        message: message.into(),
    }))
}

fn meta_result(r: Result<MetaReply, crate::queue::ClusterError>) -> Result<(), Status> {
    match r {
        Ok(MetaReply::Error(e)) => Err(Status::failed_precondition(e.text)),
        Ok(_) => Ok(()),
        Err(e) => Err(Status::unavailable(e.to_string())),
    }
}

/// Refuses a membership call on a node that does not lead the metadata group, naming the one
/// that does so the caller can go there.
fn require_meta_leader(node: &Node) -> Result<(), Status> {
    let leader = node.meta_leader();
    if leader == Some(node.id()) {
        return Ok(());
    }
    let addr = leader
        .and_then(|l| node.members().get(&l).cloned())
        .unwrap_or_default();
    Err(Status::failed_precondition(format!(
        "not the metadata leader; leader={} address={addr}",
        leader.map_or("unknown".to_owned(), |l| l.to_string())
    )))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _request: Request<pb::Empty>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let node = self.node()?;
        Ok(Response::new(node.status()))
    }

    async fn add_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let node = self.node()?;
        require_meta_leader(&node)?;
        let req = request.into_inner();
        if req.node_id == 0 || req.address.is_empty() {
            return Err(Status::invalid_argument("node id and address are required"));
        }
        let raft = node.meta_raft();
        raft.add_learner(
            req.node_id,
            BasicNode {
                addr: req.address.clone(),
            },
            true,
        )
        .await
        .map_err(|e| Status::unavailable(format!("adding node {} as learner: {e}", req.node_id)))?;
        let mut voters: BTreeSet<NodeId> = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters.insert(req.node_id);
        raft.change_membership(voters, true)
            .await
            .map_err(|e| Status::unavailable(format!("promoting node {}: {e}", req.node_id)))?;
        reply(format!("node {} ({}) joined", req.node_id, req.address))
    }

    async fn remove_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let node = self.node()?;
        require_meta_leader(&node)?;
        let gone = request.into_inner().node_id;
        let raft = node.meta_raft();
        let voters: BTreeSet<NodeId> = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .filter(|n| *n != gone)
            .collect();
        if voters.is_empty() {
            return Err(Status::failed_precondition("cannot remove the last node"));
        }
        // Replicas first: every queue on the node gets a replacement, so its replica count
        // stays what it was; the groups converge in the background.
        let moves = node.replacements_for(gone);
        let moved = moves.len();
        for (vhost, name, replicas) in moves {
            meta_result(
                node.meta_write(MetaCmd::SetReplicas {
                    vhost,
                    name,
                    replicas,
                })
                .await,
            )?;
        }
        // The node leaves only once every group it was in has a quorum without it: removing
        // it while a move is still under way could leave a group with too few voters.
        let waiting = node.wait_moves_converged(gone, MOVES_CONVERGE).await;
        if waiting > 0 {
            return Err(Status::unavailable(format!(
                "{waiting} queue replica move(s) off node {gone} have not converged within \
                 {MOVES_CONVERGE:?}; node {gone} was not removed (the moves go on: run \
                 remove-node again)"
            )));
        }
        raft.change_membership(voters, false)
            .await
            .map_err(|e| Status::unavailable(format!("removing node {gone}: {e}")))?;
        reply(format!(
            "node {gone} removed; {moved} queue replica set(s) moved off it"
        ))
    }

    async fn add_queue_replica(
        &self,
        request: Request<pb::QueueReplicaRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let node = self.node()?;
        let req = request.into_inner();
        if !node.members().contains_key(&req.node_id) {
            return Err(Status::invalid_argument(format!(
                "node {} is not a cluster member",
                req.node_id
            )));
        }
        let mut replicas = node.replicas_of(&req.vhost, &req.queue)?;
        if replicas.contains(&req.node_id) {
            return reply("already a replica");
        }
        replicas.push(req.node_id);
        meta_result(
            node.meta_write(MetaCmd::SetReplicas {
                vhost: req.vhost,
                name: req.queue,
                replicas: replicas.clone(),
            })
            .await,
        )?;
        reply(format!("replicas now {replicas:?}"))
    }

    async fn remove_queue_replica(
        &self,
        request: Request<pb::QueueReplicaRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let node = self.node()?;
        let req = request.into_inner();
        let mut replicas = node.replicas_of(&req.vhost, &req.queue)?;
        if !replicas.contains(&req.node_id) {
            return reply("not a replica");
        }
        replicas.retain(|n| *n != req.node_id);
        if replicas.is_empty() {
            return Err(Status::failed_precondition(
                "cannot remove a queue's last replica",
            ));
        }
        meta_result(
            node.meta_write(MetaCmd::SetReplicas {
                vhost: req.vhost,
                name: req.queue,
                replicas: replicas.clone(),
            })
            .await,
        )?;
        reply(format!("replicas now {replicas:?}"))
    }

    async fn access(
        &self,
        request: Request<pb::AccessRequest>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        use pb::access_request::Op;
        let node = self.node()?;
        let op = request
            .into_inner()
            .op
            .ok_or_else(|| Status::invalid_argument("no operation"))?;
        let (cmd, done) = match op {
            Op::AddVhost(name) => (
                MetaCmd::AddVhost { name: name.clone() },
                format!("vhost '{name}' added"),
            ),
            Op::DeleteVhost(name) => (
                MetaCmd::DeleteVhost { name: name.clone() },
                format!("vhost '{name}' deleted with its queues and exchanges"),
            ),
            Op::PutUser(u) => {
                // Only the salted hash is kept, in RabbitMQ's format.
                let salt: [u8; 4] = rand_salt();
                (
                    MetaCmd::PutUser {
                        name: u.name.clone(),
                        password_hash: warren_core::meta::password_hash(salt, &u.password),
                        tags: u.tags,
                    },
                    format!("user '{}' set", u.name),
                )
            }
            Op::DeleteUser(name) => (
                MetaCmd::DeleteUser { name: name.clone() },
                format!("user '{name}' deleted"),
            ),
            Op::SetPermissions(p) => {
                for (what, expr) in [
                    ("configure", &p.configure),
                    ("write", &p.write),
                    ("read", &p.read),
                ] {
                    check_expression(what, expr)?;
                }
                (
                    MetaCmd::SetPermissions {
                        user: p.user.clone(),
                        vhost: p.vhost.clone(),
                        permissions: warren_core::meta::Permissions {
                            configure: p.configure,
                            write: p.write,
                            read: p.read,
                        },
                    },
                    format!("permissions of '{}' in vhost '{}' set", p.user, p.vhost),
                )
            }
            Op::SetPolicy(p) => {
                let definition = definition_table(&p.definition)?;
                (
                    MetaCmd::SetPolicy {
                        vhost: p.vhost.clone(),
                        policy: warren_core::meta::Policy {
                            name: p.name.clone(),
                            pattern: p.pattern,
                            apply_to: if p.apply_to.is_empty() {
                                "all".to_owned()
                            } else {
                                p.apply_to
                            },
                            priority: p.priority,
                            definition,
                        },
                    },
                    format!("policy '{}' in vhost '{}' set", p.name, p.vhost),
                )
            }
            Op::ClearPolicy(p) => (
                MetaCmd::ClearPolicy {
                    vhost: p.vhost.clone(),
                    name: p.name.clone(),
                },
                format!("policy '{}' in vhost '{}' cleared", p.name, p.vhost),
            ),
            Op::ClearPermissions(p) => (
                MetaCmd::ClearPermissions {
                    user: p.user.clone(),
                    vhost: p.vhost.clone(),
                },
                format!("permissions of '{}' in vhost '{}' cleared", p.user, p.vhost),
            ),
        };
        meta_result(node.meta_write(cmd).await)?;
        reply(done)
    }

    async fn set_resource_limits(
        &self,
        request: Request<pb::ResourceLimits>,
    ) -> Result<Response<pb::ResourceLimits>, Status> {
        let node = self.node()?;
        let monitor = node
            .resource_monitor()
            .ok_or_else(|| Status::unavailable("this node runs no resource monitor"))?;
        let r = request.into_inner();
        monitor.set_limits(r.memory_high_watermark, r.disk_free_limit);
        let now = monitor.report();
        Ok(Response::new(pb::ResourceLimits {
            memory_high_watermark: Some(now.memory_high_watermark),
            disk_free_limit: Some(now.disk_free_limit),
            memory_used: now.memory_used,
            disk_free: now.disk_free,
            alarm: now.alarm.unwrap_or_default(),
        }))
    }

    async fn list_access(
        &self,
        _request: Request<pb::Empty>,
    ) -> Result<Response<pb::AccessListing>, Status> {
        let node = self.node()?;
        let meta = node.meta();
        Ok(Response::new(pb::AccessListing {
            vhosts: meta.vhost_names().map(str::to_owned).collect(),
            users: meta
                .users()
                .map(|u| pb::UserSpec {
                    name: u.name.clone(),
                    password: String::new(),
                    tags: u.tags.clone(),
                })
                .collect(),
            permissions: meta
                .all_permissions()
                .map(|(user, vhost, p)| pb::PermissionSpec {
                    user: user.to_owned(),
                    vhost: vhost.to_owned(),
                    configure: p.configure.clone(),
                    write: p.write.clone(),
                    read: p.read.clone(),
                })
                .collect(),
            policies: meta
                .policies()
                .map(|(vhost, p)| pb::PolicySpec {
                    vhost: vhost.to_owned(),
                    name: p.name.clone(),
                    pattern: p.pattern.clone(),
                    apply_to: p.apply_to.clone(),
                    priority: p.priority,
                    definition: definition_json(&p.definition),
                })
                .collect(),
        }))
    }

    async fn rebalance_leaders(
        &self,
        _request: Request<pb::Empty>,
    ) -> Result<Response<pb::AdminReply>, Status> {
        let node = self.node()?;
        let plan = node.balanced_preferences();
        let changed = plan.len();
        for (vhost, name, replicas) in plan {
            meta_result(
                node.meta_write(MetaCmd::SetReplicas {
                    vhost,
                    name,
                    replicas,
                })
                .await,
            )?;
        }
        reply(format!(
            "{changed} queue(s) get a new preferred leader; leadership moves as the groups converge"
        ))
    }
}

impl Node {
    pub(crate) fn replicas_of(&self, vhost: &str, queue: &str) -> Result<Vec<NodeId>, Status> {
        let meta = self.meta();
        let q = meta
            .queue(vhost, queue)
            .ok_or_else(|| Status::not_found(format!("no queue '{queue}' in vhost '{vhost}'")))?;
        match &q.placement {
            Placement::Replicated { replicas, .. } => Ok(replicas.clone()),
            Placement::Local { .. } => Err(Status::failed_precondition(format!(
                "queue '{queue}' is not replicated"
            ))),
        }
    }

    /// New replica sets for every queue with a replica on `gone`: the member with the fewest
    /// replicas that the queue does not use yet takes its place (the set shrinks when there
    /// is no such member).
    pub(crate) fn replacements_for(&self, gone: NodeId) -> Vec<(String, String, Vec<NodeId>)> {
        let members: Vec<NodeId> = self
            .members()
            .keys()
            .copied()
            .filter(|n| *n != gone)
            .collect();
        let meta = self.meta();
        let mut counts: HashMap<NodeId, usize> = meta
            .replica_counts()
            .into_iter()
            .map(|(n, (c, _))| (n, c))
            .collect();
        let mut out = Vec::new();
        for (vhost, q) in meta.queues() {
            let Placement::Replicated { replicas, .. } = &q.placement else {
                continue;
            };
            let Some(pos) = replicas.iter().position(|n| *n == gone) else {
                continue;
            };
            let mut new = replicas.clone();
            let candidate = members
                .iter()
                .filter(|n| !replicas.contains(n))
                .min_by_key(|n| (counts.get(n).copied().unwrap_or(0), **n))
                .copied();
            match candidate {
                Some(c) => {
                    new[pos] = c;
                    *counts.entry(c).or_default() += 1;
                }
                None => {
                    new.remove(pos);
                }
            }
            if !new.is_empty() {
                out.push((vhost.to_owned(), q.name.clone(), new));
            }
        }
        out
    }

    /// Reorders replica sets so preferred leaders (first replicas) spread evenly over the
    /// members; returns only the queues whose order changes.
    pub(crate) fn balanced_preferences(&self) -> Vec<(String, String, Vec<NodeId>)> {
        let meta = self.meta();
        let mut leads: BTreeMap<NodeId, usize> =
            self.members().keys().map(|n| (*n, 0usize)).collect();
        let mut out = Vec::new();
        let mut queues: Vec<(String, String, Vec<NodeId>)> = meta
            .queues()
            .filter_map(|(v, q)| match &q.placement {
                Placement::Replicated { replicas, .. } => {
                    Some((v.to_owned(), q.name.clone(), replicas.clone()))
                }
                Placement::Local { .. } => None,
            })
            .collect();
        queues.sort();
        for (vhost, name, replicas) in queues {
            let Some(best) = replicas
                .iter()
                .copied()
                .filter(|n| leads.contains_key(n))
                .min_by_key(|n| (leads[n], *n))
            else {
                continue;
            };
            *leads.entry(best).or_default() += 1;
            if replicas.first() != Some(&best) {
                let mut new = vec![best];
                new.extend(replicas.iter().copied().filter(|n| *n != best));
                out.push((vhost, name, new));
            }
        }
        out
    }

    /// This node's view of the cluster, for `warrenctl status`.
    pub fn status(&self) -> pb::StatusReply {
        let down: BTreeSet<NodeId> = self.down_nodes().into_iter().collect();
        let meta_metrics = self.meta_raft().metrics().borrow_watched().clone();
        let voters: BTreeSet<NodeId> = meta_metrics
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        let members = self
            .members()
            .into_iter()
            .map(|(id, address)| pb::Member {
                node_id: id,
                address,
                voter: voters.contains(&id),
                alive: id == self.id() || !down.contains(&id),
            })
            .collect();
        let lag_of = |m: &openraft::RaftMetrics<crate::types::TypeConfig>| {
            let last = m.last_log_index.unwrap_or(0);
            m.replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(n, matched)| {
                            (*n, last.saturating_sub(matched.map_or(0, |l| l.index)))
                        })
                        .collect::<HashMap<u64, u64>>()
                })
                .unwrap_or_default()
        };
        let mut groups = vec![pb::GroupStatus {
            group: 0,
            name: "metadata".into(),
            leader: meta_metrics.current_leader.unwrap_or(0),
            replicas: voters.iter().copied().collect(),
            last_log_index: meta_metrics.last_log_index.unwrap_or(0),
            committed: meta_metrics.last_applied.map_or(0, |l| l.index),
            lag: lag_of(&meta_metrics),
            messages_ready: 0,
            messages_unacked: 0,
        }];
        let mut handles = self.queue_handles();
        handles.sort_by_key(|h| h.id());
        for h in handles {
            let stats = h.stats();
            let (leader, last, committed, lag) = match h.raft() {
                Some(raft) => {
                    let m = raft.metrics().borrow_watched().clone();
                    let lag = if m.state == ServerState::Leader {
                        lag_of(&m)
                    } else {
                        HashMap::new()
                    };
                    (
                        m.current_leader.unwrap_or(0),
                        m.last_log_index.unwrap_or(0),
                        m.last_applied.map_or(0, |l| l.index),
                        lag,
                    )
                }
                // A node without a replica only has a forwarding hint, which may be stale;
                // it reports no leader rather than a guess (the replicas report the real one).
                None => (0, 0, 0, HashMap::new()),
            };
            groups.push(pb::GroupStatus {
                group: h.id(),
                name: format!("{}/{}", h.vhost(), h.name()),
                leader,
                replicas: h.replicas(),
                last_log_index: last,
                committed,
                lag,
                messages_ready: stats.ready,
                messages_unacked: stats.unacked,
            });
        }
        pb::StatusReply {
            node_id: self.id(),
            members,
            groups,
        }
    }
}
