//! `warrenctl`: administers a Warren cluster through any node's admin service (the node's
//! cluster listener, 25672 by default): cluster status, adding and removing nodes, growing and
//! shrinking a queue's replica set, rebalancing queue leaders, and virtual hosts, users and
//! permissions.
//!
//! Membership changes must run on the metadata group's leader; a node that is not the leader
//! answers with the leader's address and warrenctl repeats the call there.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};
use warren_proto::access_request::Op;
use warren_proto::admin_client::AdminClient;
use warren_proto::{
    AccessRequest, Empty, NodeRequest, PermissionSpec, PolicySpec, QueueReplicaRequest,
    ResourceLimits, StatusReply, UserSpec,
};

#[derive(Parser)]
#[command(name = "warrenctl", version, about = "Administer a Warren cluster")]
struct Cli {
    /// Any node's cluster address (host:port).
    #[arg(
        long,
        short = 'n',
        env = "WARREN_NODE",
        default_value = "127.0.0.1:25672"
    )]
    node: String,
    /// Per-call timeout in seconds (adding a node waits for it to catch up).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Members (with liveness), and every group's leader, replicas, lag and message counts.
    Status,
    /// Adds a node (started with the cluster's member list but not in it) to the cluster.
    AddNode {
        id: u64,
        address: String,
    },
    /// Removes a node; each of its queue replicas is re-created on another member.
    RemoveNode {
        id: u64,
    },
    /// Adds a replica of a queue on a node.
    AddReplica {
        queue: String,
        node: u64,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Removes a queue's replica from a node.
    RemoveReplica {
        queue: String,
        node: u64,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Spreads queue leaders evenly over the members.
    Rebalance,
    /// Creates a virtual host (with the standard exchanges).
    AddVhost {
        name: String,
    },
    /// Deletes a virtual host and everything in it.
    DeleteVhost {
        name: String,
    },
    /// Creates a user or replaces its password and tags. The password is stored hashed.
    AddUser {
        name: String,
        password: String,
        /// Comma-separated tags (e.g. administrator,monitoring).
        #[arg(long, value_delimiter = ',')]
        tags: Vec<String>,
    },
    DeleteUser {
        name: String,
    },
    /// Sets a user's configure, write and read permissions (regular expressions) in a vhost.
    SetPermissions {
        user: String,
        configure: String,
        write: String,
        read: String,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    ClearPermissions {
        user: String,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Sets a policy: queue arguments for the queues whose name matches PATTERN, e.g.
    /// `set-policy ttl '^orders' '{"message-ttl": 60000, "dead-letter-exchange": "dlx"}'`.
    SetPolicy {
        name: String,
        pattern: String,
        /// A JSON object of RabbitMQ policy keys.
        definition: String,
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// queues, exchanges or all.
        #[arg(long, default_value = "all")]
        apply_to: String,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    ClearPolicy {
        name: String,
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Lists vhosts, users (from the metadata; configured users are the nodes' own),
    /// permissions and policies.
    ListAccess,
    /// Shows (and with options changes) the node's resource alarm limits: publishers are
    /// blocked while memory is above the high watermark or free disk below its limit.
    ResourceLimits {
        /// Resident memory in bytes; 0 turns the memory alarm off.
        #[arg(long)]
        memory_high_watermark: Option<u64>,
        /// Free disk space in bytes; 0 turns the disk alarm off.
        #[arg(long)]
        disk_free_limit: Option<u64>,
    },
}

async fn client(addr: &str, timeout: Duration) -> anyhow::Result<AdminClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {addr}: {e}"))?;
    Ok(AdminClient::new(channel))
}

/// The leader's address out of a "not the metadata leader" refusal.
fn leader_address(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    let addr = status.message().split("address=").nth(1)?.trim();
    (!addr.is_empty()).then(|| addr.to_owned())
}

/// A "not the metadata leader" refusal that names no member to go to: the node knows no
/// leader, or only one that is no longer a member (just after the leader removed itself),
/// so an election is under way.
fn no_leader_yet(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition
        && status.message().starts_with("not the metadata leader")
        && leader_address(status).is_none()
}

/// How long a membership call waits for the metadata group to elect a leader.
const LEADER_WAIT: Duration = Duration::from_secs(15);
const LEADER_POLL: Duration = Duration::from_millis(200);

/// Runs a call, following at most two redirects to the metadata leader and asking again
/// while the metadata group has no leader (for up to `LEADER_WAIT`).
macro_rules! call_on_leader {
    ($cli:expr, $timeout:expr, |$c:ident| $body:expr) => {{
        let mut addr = $cli.node.clone();
        let mut hops = 0;
        let deadline = std::time::Instant::now() + LEADER_WAIT;
        loop {
            let mut $c = client(&addr, $timeout).await?;
            match $body.await {
                Ok(r) => break r.into_inner(),
                Err(status) => match leader_address(&status) {
                    Some(next) if hops < 2 && next != addr => {
                        hops += 1;
                        addr = next;
                    }
                    None if no_leader_yet(&status) && std::time::Instant::now() < deadline => {
                        tokio::time::sleep(LEADER_POLL).await;
                    }
                    _ => anyhow::bail!("{}", status.message()),
                },
            }
        }
    }};
}

fn print_status(s: &StatusReply) {
    println!("node {} sees {} member(s):", s.node_id, s.members.len());
    for m in &s.members {
        println!(
            "  {:>4}  {:<24} {:<7} {}",
            m.node_id,
            m.address,
            if m.voter { "voter" } else { "learner" },
            if m.alive { "up" } else { "DOWN" }
        );
    }
    println!();
    println!(
        "  {:>6}  {:<32} {:>6}  {:<12} {:>10} {:>10} {:>8} {:>8}  lag",
        "group", "name", "leader", "replicas", "last-log", "applied", "ready", "unacked"
    );
    for g in &s.groups {
        let replicas = g
            .replicas
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut lag: Vec<(u64, u64)> = g.lag.iter().map(|(n, l)| (*n, *l)).collect();
        lag.sort();
        let lag = lag
            .iter()
            .map(|(n, l)| format!("{n}:{l}"))
            .collect::<Vec<_>>()
            .join(" ");
        let leader = if g.leader == 0 {
            "-".to_owned()
        } else {
            g.leader.to_string()
        };
        println!(
            "  {:>6}  {:<32} {:>6}  {:<12} {:>10} {:>10} {:>8} {:>8}  {}",
            g.group,
            g.name,
            leader,
            replicas,
            g.last_log_index,
            g.committed,
            g.messages_ready,
            g.messages_unacked,
            lag
        );
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(cli.timeout);
    match &cli.command {
        Command::Status => {
            let mut c = client(&cli.node, timeout).await?;
            let status = c.status(Empty {}).await?.into_inner();
            print_status(&status);
        }
        Command::AddNode { id, address } => {
            let req = NodeRequest {
                node_id: *id,
                address: address.clone(),
            };
            let r = call_on_leader!(cli, timeout, |c| c.add_node(req.clone()));
            println!("{}", r.message);
        }
        Command::RemoveNode { id } => {
            let req = NodeRequest {
                node_id: *id,
                address: String::new(),
            };
            let r = call_on_leader!(cli, timeout, |c| c.remove_node(req.clone()));
            println!("{}", r.message);
        }
        Command::AddReplica { queue, node, vhost }
        | Command::RemoveReplica { queue, node, vhost } => {
            let req = QueueReplicaRequest {
                vhost: vhost.clone(),
                queue: queue.clone(),
                node_id: *node,
            };
            let mut c = client(&cli.node, timeout).await?;
            let r = if matches!(cli.command, Command::AddReplica { .. }) {
                c.add_queue_replica(req).await
            } else {
                c.remove_queue_replica(req).await
            }
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            println!("{}", r.into_inner().message);
        }
        Command::AddVhost { .. }
        | Command::DeleteVhost { .. }
        | Command::AddUser { .. }
        | Command::DeleteUser { .. }
        | Command::SetPermissions { .. }
        | Command::ClearPermissions { .. }
        | Command::SetPolicy { .. }
        | Command::ClearPolicy { .. } => {
            let op = access_op(&cli.command).expect("an access command");
            let mut c = client(&cli.node, timeout).await?;
            let r = c
                .access(AccessRequest { op: Some(op) })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            println!("{}", r.into_inner().message);
        }
        Command::ListAccess => {
            let mut c = client(&cli.node, timeout).await?;
            let l = c
                .list_access(Empty {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            println!("vhosts: {}", l.vhosts.join(", "));
            for u in &l.users {
                println!("user {} tags=[{}]", u.name, u.tags.join(","));
            }
            for p in &l.permissions {
                println!(
                    "permissions {} vhost={} configure={:?} write={:?} read={:?}",
                    p.user, p.vhost, p.configure, p.write, p.read
                );
            }
            for p in &l.policies {
                println!(
                    "policy {} vhost={} pattern={:?} apply-to={} priority={} definition={}",
                    p.name, p.vhost, p.pattern, p.apply_to, p.priority, p.definition
                );
            }
        }
        Command::ResourceLimits {
            memory_high_watermark,
            disk_free_limit,
        } => {
            let mut c = client(&cli.node, timeout).await?;
            let r = c
                .set_resource_limits(ResourceLimits {
                    memory_high_watermark: *memory_high_watermark,
                    disk_free_limit: *disk_free_limit,
                    ..Default::default()
                })
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?
                .into_inner();
            let show = |v: Option<u64>| v.map_or("unknown".to_owned(), |v| v.to_string());
            println!(
                "memory: {} used, high watermark {}",
                show(r.memory_used),
                show(r.memory_high_watermark)
            );
            println!(
                "disk: {} free, limit {}",
                show(r.disk_free),
                show(r.disk_free_limit)
            );
            if r.alarm.is_empty() {
                println!("alarm: none");
            } else {
                println!("alarm: {}", r.alarm);
            }
        }
        Command::Rebalance => {
            let mut c = client(&cli.node, timeout).await?;
            let r = c
                .rebalance_leaders(Empty {})
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            println!("{}", r.into_inner().message);
        }
    }
    Ok(())
}

/// The admin request of a vhost, user or permission command.
fn access_op(command: &Command) -> Option<Op> {
    Some(match command {
        Command::AddVhost { name } => Op::AddVhost(name.clone()),
        Command::DeleteVhost { name } => Op::DeleteVhost(name.clone()),
        Command::AddUser {
            name,
            password,
            tags,
        } => Op::PutUser(UserSpec {
            name: name.clone(),
            password: password.clone(),
            tags: tags.clone(),
        }),
        Command::DeleteUser { name } => Op::DeleteUser(name.clone()),
        Command::SetPermissions {
            user,
            configure,
            write,
            read,
            vhost,
        } => Op::SetPermissions(PermissionSpec {
            user: user.clone(),
            vhost: vhost.clone(),
            configure: configure.clone(),
            write: write.clone(),
            read: read.clone(),
        }),
        Command::ClearPermissions { user, vhost } => Op::ClearPermissions(PermissionSpec {
            user: user.clone(),
            vhost: vhost.clone(),
            ..Default::default()
        }),
        Command::SetPolicy {
            name,
            pattern,
            definition,
            priority,
            apply_to,
            vhost,
        } => Op::SetPolicy(PolicySpec {
            vhost: vhost.clone(),
            name: name.clone(),
            pattern: pattern.clone(),
            apply_to: apply_to.clone(),
            priority: *priority,
            definition: definition.clone(),
        }),
        Command::ClearPolicy { name, vhost } => Op::ClearPolicy(PolicySpec {
            vhost: vhost.clone(),
            name: name.clone(),
            ..Default::default()
        }),
        _ => return None,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warrenctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warrenctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_follow_the_leader_address() {
        let s = tonic::Status::failed_precondition(
            "not the metadata leader; leader=2 address=127.0.0.1:25702",
        );
        assert_eq!(leader_address(&s).as_deref(), Some("127.0.0.1:25702"));
        let unknown =
            tonic::Status::failed_precondition("not the metadata leader; leader=unknown address=");
        assert_eq!(leader_address(&unknown), None);
        assert_eq!(leader_address(&tonic::Status::unavailable("x")), None);
    }

    #[test]
    fn a_refusal_naming_no_reachable_leader_means_an_election_is_under_way() {
        let elsewhere = tonic::Status::failed_precondition(
            "not the metadata leader; leader=2 address=127.0.0.1:25702",
        );
        assert!(!no_leader_yet(&elsewhere));
        // The leader removed itself: the node still names it, but it has no address.
        let removed =
            tonic::Status::failed_precondition("not the metadata leader; leader=2 address=");
        assert!(no_leader_yet(&removed));
        let unknown =
            tonic::Status::failed_precondition("not the metadata leader; leader=unknown address=");
        assert!(no_leader_yet(&unknown));
        let other = tonic::Status::failed_precondition("node 9 is not a cluster member");
        assert!(!no_leader_yet(&other));
    }
}
