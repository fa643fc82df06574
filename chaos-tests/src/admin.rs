//! Talking to the cluster as an operator: `status` through the admin gRPC service (the same
//! call `warrenctl status` makes, read as structured data), and membership changes through
//! the real `warrenctl` binary, so the command line is exercised as users run it.
//!
//! The nemesis (`nemesis.rs`) uses these to find leaders and change membership; the run
//! (`run.rs`) uses them to wait for the drain and to compare the nodes' views of the
//! metadata at the end.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tonic::transport::Endpoint;
use warren_proto::admin_client::AdminClient;
use warren_proto::{Empty, StatusReply};

use crate::cluster::cluster_addr;

/// Per-call bound for a status request.
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);

/// One group as a node reports it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub leader: u64,
    pub replicas: Vec<u64>,
    pub ready: u64,
    pub unacked: u64,
    pub last_log_index: u64,
    pub committed: u64,
}

/// A node's view of the cluster.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Status {
    pub node: u64,
    /// Member id -> (voter, alive).
    pub members: BTreeMap<u64, (bool, bool)>,
    /// Group name (`metadata`, or `<vhost>/<queue>`) -> group.
    pub groups: BTreeMap<String, Group>,
}

impl Status {
    /// The group of queue `queue` in vhost `/`.
    pub fn queue(&self, queue: &str) -> Option<&Group> {
        let suffix = format!("/{queue}");
        self.groups
            .iter()
            .find(|(name, _)| name.ends_with(&suffix) && name.trim_end_matches(&suffix) == "/")
            .or_else(|| self.groups.iter().find(|(name, _)| name.ends_with(&suffix)))
            .map(|(_, g)| g)
    }
}

fn convert(s: StatusReply) -> Status {
    Status {
        node: s.node_id,
        members: s
            .members
            .iter()
            .map(|m| (m.node_id, (m.voter, m.alive)))
            .collect(),
        groups: s
            .groups
            .into_iter()
            .map(|g| {
                let mut replicas = g.replicas.clone();
                replicas.sort_unstable();
                (
                    g.name.clone(),
                    Group {
                        name: g.name,
                        leader: g.leader,
                        replicas,
                        ready: g.messages_ready,
                        unacked: g.messages_unacked,
                        last_log_index: g.last_log_index,
                        committed: g.committed,
                    },
                )
            })
            .collect(),
    }
}

/// Node `id`'s status, or an error if it does not answer within a few seconds.
pub async fn status(id: u64) -> anyhow::Result<Status> {
    let addr = cluster_addr(id);
    let call = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(STATUS_TIMEOUT)
            .timeout(STATUS_TIMEOUT)
            .connect()
            .await?;
        let reply = AdminClient::new(channel).status(Empty {}).await?;
        anyhow::Ok(reply.into_inner())
    };
    let reply = tokio::time::timeout(STATUS_TIMEOUT * 2, call)
        .await
        .map_err(|_| anyhow::anyhow!("status of node {id} timed out"))??;
    Ok(convert(reply))
}

/// The leader of a queue's group according to the first of `nodes` that knows one.
pub async fn queue_leader(nodes: &[u64], queue: &str) -> Option<u64> {
    for n in nodes {
        if let Ok(s) = status(*n).await
            && let Some(g) = s.queue(queue)
            && g.leader != 0
        {
            return Some(g.leader);
        }
    }
    None
}

/// The metadata group's leader according to the first of `nodes` that knows one.
pub async fn metadata_leader(nodes: &[u64]) -> Option<u64> {
    for n in nodes {
        if let Ok(s) = status(*n).await
            && let Some(g) = s.groups.get("metadata")
            && g.leader != 0
        {
            return Some(g.leader);
        }
    }
    None
}

/// Runs `warrenctl --node <node's cluster address> ARGS` with a bound; returns its stdout,
/// or an error with its stderr.
pub async fn warrenctl(
    bin: &Path,
    via: u64,
    args: &[String],
    limit: Duration,
) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("--node")
        .arg(cluster_addr(via))
        .arg("--timeout")
        .arg(limit.as_secs().max(1).to_string())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(limit + Duration::from_secs(5), cmd.output())
        .await
        .map_err(|_| anyhow::anyhow!("warrenctl {} timed out", args.join(" ")))?
        .context("cannot run warrenctl")?;
    if !out.status.success() {
        bail!(
            "warrenctl {} (via node {via}): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// What must agree between nodes at the end of a run: the member list with voter flags
/// and, per group, its replica set. Leaders and counts may legitimately differ for a
/// moment; these may not once the cluster is quiet.
pub fn metadata_view(s: &Status) -> serde_json::Value {
    let members: BTreeMap<String, bool> = s
        .members
        .iter()
        .map(|(id, (voter, _))| (id.to_string(), *voter))
        .collect();
    let groups: BTreeMap<&str, &Vec<u64>> = s
        .groups
        .iter()
        .map(|(name, g)| (name.as_str(), &g.replicas))
        .collect();
    serde_json::json!({ "members": members, "groups": groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_with(names: &[&str]) -> Status {
        Status {
            node: 1,
            members: BTreeMap::new(),
            groups: names
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        Group {
                            name: n.to_string(),
                            leader: 2,
                            replicas: vec![1, 2, 3],
                            ready: 0,
                            unacked: 0,
                            last_log_index: 0,
                            committed: 0,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn queue_groups_are_found_by_name_in_the_default_vhost() {
        let s = status_with(&["metadata", "//chaos-q1", "//chaos-q10"]);
        assert_eq!(s.queue("chaos-q1").unwrap().name, "//chaos-q1");
        assert_eq!(s.queue("chaos-q10").unwrap().name, "//chaos-q10");
        let s = status_with(&["metadata", "/chaos-q2"]);
        assert_eq!(s.queue("chaos-q2").unwrap().name, "/chaos-q2");
        assert!(s.queue("chaos-q3").is_none());
    }
}
