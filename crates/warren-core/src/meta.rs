//! The metadata state machine: vhosts, exchanges, queues and bindings, and publish routing over
//! them.
//!
//! Every node applies the metadata Raft group's log to a `MetaState` (the cluster crate is the
//! adapter), so routing a publish is a local, lock-protected read on any node. Commands are
//! validated here, not by the proposer, so that concurrent declares from different nodes are
//! settled by log order and every replica gives the same answer. Matching rules live in
//! `routing`; what a queue holds lives in `queue`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use warren_codec::{FieldTable, FieldValue, ShortStr, reply_code};

use crate::error::{AmqpError, AmqpResult};
use crate::ids::{ConnectionRef, GroupId, NodeId, NodeRun, TxId};
use crate::routing::{TopicPattern, headers_match, topic_words, validate_headers_binding};

pub const DEFAULT_VHOST: &str = "/";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(kind: &str) -> Option<Self> {
        Some(match kind {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDef {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    /// The node run that declared a transient exchange; it goes when that run is cleaned up.
    pub declared_by: Option<NodeRun>,
}

/// Where a queue's messages live.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Placement {
    /// A durable queue replicated by its own Raft group.
    Replicated {
        group: GroupId,
        replicas: Vec<NodeId>,
    },
    /// A transient or exclusive queue held in memory by one run of one node.
    Local { run: NodeRun },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    /// Unique for the cluster's lifetime, never reused; a replicated queue's Raft group id.
    pub id: GroupId,
    pub name: String,
    pub durable: bool,
    pub exclusive_owner: Option<ConnectionRef>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    pub placement: Placement,
}

impl QueueDef {
    pub fn group(&self) -> Option<GroupId> {
        match self.placement {
            Placement::Replicated { group, .. } => Some(group),
            Placement::Local { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Destination {
    Queue(String),
    Exchange(String),
}

impl Destination {
    fn describe(&self) -> String {
        match self {
            Destination::Queue(q) => format!("queue '{q}'"),
            Destination::Exchange(e) => format!("exchange '{e}'"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// Bindings out of one exchange, plus the index routing uses. The index is derived, rebuilt
/// whenever the bindings change (rare) so the publish path does no parsing.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct BindingSet {
    bindings: Vec<Binding>,
    #[serde(skip)]
    index: RouteIndex,
}

#[derive(Clone, Debug, Default)]
struct RouteIndex {
    by_key: HashMap<String, Vec<usize>>,
    topics: Vec<(TopicPattern, usize)>,
}

impl BindingSet {
    fn rebuild(&mut self) {
        let mut index = RouteIndex::default();
        for (i, b) in self.bindings.iter().enumerate() {
            index
                .by_key
                .entry(b.routing_key.clone())
                .or_default()
                .push(i);
            index.topics.push((TopicPattern::parse(&b.routing_key), i));
        }
        self.index = index;
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VHost {
    exchanges: BTreeMap<String, ExchangeDef>,
    queues: BTreeMap<String, QueueDef>,
    /// Keyed by source exchange.
    bindings: BTreeMap<String, BindingSet>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDecl {
    pub vhost: String,
    pub name: String,
    pub kind: String,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    pub declared_by: NodeRun,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueDecl {
    pub vhost: String,
    pub name: String,
    pub durable: bool,
    pub exclusive_owner: Option<ConnectionRef>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
    /// The declaring node's run: transient and exclusive queues live there.
    pub declared_by: NodeRun,
    /// Replica set for a replicated queue, chosen by the proposer from the live members.
    pub replicas: Vec<NodeId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BindingDecl {
    pub vhost: String,
    pub source: String,
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
    /// Set when the client acts on a queue: exclusive queues refuse other connections.
    pub by: Option<ConnectionRef>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaCmd {
    DeclareExchange(ExchangeDecl),
    DeleteExchange {
        vhost: String,
        name: String,
        if_unused: bool,
    },
    DeclareQueue(QueueDecl),
    /// `if-unused` and `if-empty` depend on the queue's own state and are checked by the
    /// caller before proposing; exclusivity is checked here.
    DeleteQueue {
        vhost: String,
        name: String,
        by: Option<ConnectionRef>,
    },
    Bind(BindingDecl),
    Unbind(BindingDecl),
    /// A connection closed: its exclusive queues go.
    ConnectionClosed {
        conn: ConnectionRef,
    },
    /// A node started a new run: what earlier runs of that node held only in memory is gone.
    NodeRestarted {
        run: NodeRun,
    },
    /// A node was declared down by the failure detector: the exclusive queues of its
    /// connections go, as they would if those connections had closed. Its transient queues
    /// stay (they return with the node, as RabbitMQ classic queues do).
    NodeDown {
        node: NodeId,
    },
    /// The replica set a replicated queue should have (grow, shrink, replace a removed node).
    /// The first replica is the preferred leader. The queue's group converges to it.
    SetReplicas {
        vhost: String,
        name: String,
        replicas: Vec<NodeId>,
    },
    /// Creates a virtual host with the standard exchanges (no-op if it exists).
    AddVhost {
        name: String,
    },
    /// Deletes a virtual host with everything in it.
    DeleteVhost {
        name: String,
    },
    /// Creates or replaces a user. `password_hash` is RabbitMQ's format (base64 of a 4-byte
    /// salt and SHA-256(salt ‖ password)); empty means no password login.
    PutUser {
        name: String,
        password_hash: String,
        tags: Vec<String>,
    },
    DeleteUser {
        name: String,
    },
    /// A user's permissions in a virtual host: regular expressions over resource names, as
    /// in RabbitMQ.
    SetPermissions {
        user: String,
        vhost: String,
        permissions: Permissions,
    },
    ClearPermissions {
        user: String,
        vhost: String,
    },
    /// Creates or replaces a policy of a vhost.
    SetPolicy {
        vhost: String,
        policy: Policy,
    },
    ClearPolicy {
        vhost: String,
        name: String,
    },
    /// Decides a transaction's commit (ADR 0005): the first decision for `tx` stands and
    /// every later one is answered with it, so a commit and an abort by recovery never both
    /// win.
    TxDecide {
        tx: TxId,
        commit: bool,
    },
    /// Every queue of the transaction applied its decision: it is no longer needed.
    TxForget {
        tx: TxId,
    },
}

/// A RabbitMQ policy: queue arguments applied to the queues whose name matches `pattern`
/// (a regular expression, matched anywhere in the name). Of the matching policies the one
/// with the highest priority applies; a queue's own arguments win over it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    pub pattern: String,
    /// `queues` or `all` (policies for exchanges only do not apply to queues).
    pub apply_to: String,
    pub priority: i64,
    /// Keys as in RabbitMQ: `message-ttl`, `max-length`, `dead-letter-exchange`, ...
    pub definition: FieldTable,
}

/// Policy keys and the queue arguments they stand for.
const POLICY_KEYS: &[(&str, &str)] = &[
    ("message-ttl", "x-message-ttl"),
    ("expires", "x-expires"),
    ("max-length", "x-max-length"),
    ("max-length-bytes", "x-max-length-bytes"),
    ("overflow", "x-overflow"),
    ("dead-letter-exchange", "x-dead-letter-exchange"),
    ("dead-letter-routing-key", "x-dead-letter-routing-key"),
    ("delivery-limit", "x-delivery-limit"),
    ("consumer-timeout", "x-consumer-timeout"),
];

impl Policy {
    /// Refuses what RabbitMQ refuses: a pattern that is not a regular expression, unknown
    /// keys, and `apply-to` other than queues, exchanges or all.
    pub fn validate(&self) -> AmqpResult<()> {
        regex::Regex::new(&self.pattern).map_err(|e| {
            AmqpError::precondition_failed(format!("invalid pattern '{}': {e}", self.pattern))
        })?;
        if !matches!(self.apply_to.as_str(), "queues" | "exchanges" | "all") {
            return Err(AmqpError::precondition_failed(format!(
                "invalid apply-to '{}': expected queues, exchanges or all",
                self.apply_to
            )));
        }
        let mut args = FieldTable::new();
        for (key, value) in self.definition.iter() {
            let Some((_, arg)) = POLICY_KEYS.iter().find(|(k, _)| *k == key.as_str()) else {
                return Err(AmqpError::precondition_failed(format!(
                    "unsupported policy key '{key}'"
                )));
            };
            args.insert(ShortStr::from_static(arg), value.clone());
        }
        // The values must be what the queue arguments accept.
        crate::queue::QueueConfig::from_arguments(&args).map(|_| ())
    }

    fn applies_to_queue(&self, name: &str) -> bool {
        self.apply_to != "exchanges"
            && regex::Regex::new(&self.pattern).is_ok_and(|r| r.is_match(name))
    }
}

/// A user kept in the metadata (users from the configuration file are the node's own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDef {
    pub name: String,
    pub password_hash: String,
    pub tags: Vec<String>,
}

/// RabbitMQ's password hash: base64 of a 4-byte salt followed by SHA-256(salt ‖ password).
/// The caller draws the salt (this crate draws no random numbers).
pub fn password_hash(salt: [u8; 4], password: &str) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut raw = salt.to_vec();
    raw.extend_from_slice(&h.finalize());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// Configure, write and read permissions: regular expressions a resource name must match
/// in full. An empty expression allows nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

impl Permissions {
    pub fn all() -> Self {
        Permissions {
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaReply {
    Done,
    QueueDeclared {
        created: bool,
        queue: QueueDef,
    },
    /// The decision in force for the transaction of a `TxDecide`.
    TxDecided {
        commit: bool,
    },
    Error(AmqpError),
}

/// Side effects of applying a command, for the adapter: start or stop queue groups and tell
/// consumers their queue is gone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaEffect {
    QueueCreated {
        vhost: String,
        queue: QueueDef,
    },
    QueueDeleted {
        vhost: String,
        queue: QueueDef,
    },
    ReplicasChanged {
        vhost: String,
        queue: QueueDef,
    },
    /// The arguments in force for a queue changed (a policy was set or cleared, or a new
    /// queue matches one): its own arguments over the policy's.
    QueueArguments {
        vhost: String,
        name: String,
        arguments: FieldTable,
        /// `MetaState::policy_version` when this was decided: a queue applies a later
        /// version over an earlier one, never the other way round.
        version: u64,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MetaState {
    vhosts: BTreeMap<String, VHost>,
    next_group: GroupId,
    users: BTreeMap<String, UserDef>,
    /// Keyed by (user, vhost).
    permissions: BTreeMap<(String, String), Permissions>,
    /// Keyed by (vhost, policy name).
    #[serde(default)]
    policies: BTreeMap<(String, String), Policy>,
    /// Grows with every change of the arguments policies put in force, so that queues can
    /// tell a newer `Configure` from an older one that arrives late (two leaders, one after
    /// the other, may each send one).
    #[serde(default)]
    policy_version: u64,
    /// Decisions of transactions whose queues may not all have applied them yet.
    tx_decisions: BTreeMap<TxId, bool>,
}

impl Default for MetaState {
    fn default() -> Self {
        Self::new()
    }
}

/// The arguments RabbitMQ compares when a queue is redeclared; others are ignored.
const QUEUE_EQUIVALENCE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-quorum-initial-group-size",
    "x-queue-leader-locator",
];
const EXCHANGE_EQUIVALENCE_ARGS: &[&str] = &["alternate-exchange"];

/// The exchanges every vhost starts with, as RabbitMQ predeclares them.
const STANDARD_EXCHANGES: &[(&str, ExchangeKind)] = &[
    ("", ExchangeKind::Direct),
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

/// Result of routing one publish.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routed {
    /// Target queue names, each once, in name order.
    pub queues: BTreeSet<String>,
}

fn queue_missing(vhost: &str, name: &str) -> AmqpError {
    AmqpError::not_found(format!("no queue '{name}' in vhost '{vhost}'"))
}

fn exchange_missing(vhost: &str, name: &str) -> AmqpError {
    AmqpError::not_found(format!("no exchange '{name}' in vhost '{vhost}'"))
}

fn default_exchange_refused() -> AmqpError {
    AmqpError::access_refused("operation not permitted on the default exchange")
}

fn locked(vhost: &str, name: &str) -> AmqpError {
    AmqpError::resource_locked(format!(
        "cannot obtain exclusive access to locked queue '{name}' in vhost '{vhost}'. It could be \
         originally declared on another connection or the exclusive property value does not \
         match that of the original declaration."
    ))
}

fn inequivalent(
    what: &str,
    arg: &str,
    name: &str,
    vhost: &str,
    got: String,
    cur: String,
) -> AmqpError {
    AmqpError::precondition_failed(format!(
        "inequivalent arg '{arg}' for {what} '{name}' in vhost '{vhost}': received {got} but current is {cur}"
    ))
}

fn describe_arg(value: Option<&FieldValue>) -> String {
    match value {
        None => "none".to_owned(),
        Some(v) => match v.as_str() {
            Some(s) => format!("'{s}'"),
            None => match v.as_i64() {
                Some(i) => format!("'{i}'"),
                None => format!("{v:?}"),
            },
        },
    }
}

fn args_equivalent(
    keys: &[&str],
    current: &FieldTable,
    requested: &FieldTable,
) -> Result<(), (String, String, String)> {
    for key in keys {
        let (cur, req) = (current.get(key), requested.get(key));
        let same = match (cur, req) {
            (None, None) => true,
            (Some(a), Some(b)) => crate::routing::field_values_equal(a, b),
            _ => false,
        };
        if !same {
            return Err(((*key).to_owned(), describe_arg(req), describe_arg(cur)));
        }
    }
    Ok(())
}

impl MetaState {
    /// A fresh cluster: the default vhost with the standard exchanges.
    /// The decision taken for a transaction, if any (and not yet forgotten).
    pub fn tx_decision(&self, tx: &TxId) -> Option<bool> {
        self.tx_decisions.get(tx).copied()
    }

    pub fn new() -> Self {
        let mut state = MetaState {
            vhosts: BTreeMap::new(),
            next_group: 1,
            users: BTreeMap::new(),
            permissions: BTreeMap::new(),
            policies: BTreeMap::new(),
            policy_version: 0,
            tx_decisions: BTreeMap::new(),
        };
        state.add_vhost(DEFAULT_VHOST);
        state
    }

    fn add_vhost(&mut self, name: &str) {
        let vhost = self.vhosts.entry(name.to_owned()).or_default();
        for (ex, kind) in STANDARD_EXCHANGES {
            vhost
                .exchanges
                .entry((*ex).to_owned())
                .or_insert(ExchangeDef {
                    name: (*ex).to_owned(),
                    kind: *kind,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    arguments: FieldTable::new(),
                    declared_by: None,
                });
        }
    }

    /// Rebuilds derived indexes after deserialising a snapshot.
    pub fn rebuild_indexes(&mut self) {
        for vhost in self.vhosts.values_mut() {
            for set in vhost.bindings.values_mut() {
                set.rebuild();
            }
        }
    }

    pub fn vhost_exists(&self, vhost: &str) -> bool {
        self.vhosts.contains_key(vhost)
    }

    pub fn vhost_names(&self) -> impl Iterator<Item = &str> {
        self.vhosts.keys().map(String::as_str)
    }

    pub fn user(&self, name: &str) -> Option<&UserDef> {
        self.users.get(name)
    }

    pub fn users(&self) -> impl Iterator<Item = &UserDef> {
        self.users.values()
    }

    pub fn permissions(&self, user: &str, vhost: &str) -> Option<&Permissions> {
        self.permissions.get(&(user.to_owned(), vhost.to_owned()))
    }

    /// Every (user, vhost, permissions) entry.
    pub fn all_permissions(&self) -> impl Iterator<Item = (&str, &str, &Permissions)> {
        self.permissions
            .iter()
            .map(|((u, v), p)| (u.as_str(), v.as_str(), p))
    }

    pub fn exchange(&self, vhost: &str, name: &str) -> Option<&ExchangeDef> {
        self.vhosts.get(vhost)?.exchanges.get(name)
    }

    pub fn queue(&self, vhost: &str, name: &str) -> Option<&QueueDef> {
        self.vhosts.get(vhost)?.queues.get(name)
    }

    pub fn queues(&self) -> impl Iterator<Item = (&str, &QueueDef)> {
        self.vhosts
            .iter()
            .flat_map(|(v, h)| h.queues.values().map(move |q| (v.as_str(), q)))
    }

    pub fn exchanges(&self) -> impl Iterator<Item = (&str, &ExchangeDef)> {
        self.vhosts
            .iter()
            .flat_map(|(v, h)| h.exchanges.values().map(move |e| (v.as_str(), e)))
    }

    pub fn bindings(&self) -> impl Iterator<Item = (&str, &Binding)> {
        self.vhosts.iter().flat_map(|(v, h)| {
            h.bindings
                .values()
                .flat_map(move |set| set.bindings.iter().map(move |b| (v.as_str(), b)))
        })
    }

    /// A read-only check for passive declares and for operations that must see a queue
    /// before acting on it; exclusivity applies to passive declares too.
    pub fn check_queue_access(
        &self,
        vhost: &str,
        name: &str,
        by: Option<ConnectionRef>,
    ) -> AmqpResult<&QueueDef> {
        let queue = self
            .queue(vhost, name)
            .ok_or_else(|| queue_missing(vhost, name))?;
        match queue.exclusive_owner {
            Some(owner) if Some(owner) != by => Err(locked(vhost, name)),
            _ => Ok(queue),
        }
    }

    /// Routes a publish to its target queues. An absent exchange is 404; an internal one
    /// refuses direct publishes (403), as RabbitMQ does. Exchange-to-exchange bindings are
    /// followed with cycle protection, and an exchange that routes nowhere hands the message
    /// to its `alternate-exchange`.
    pub fn route(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        headers: Option<&FieldTable>,
    ) -> AmqpResult<Routed> {
        let vh = self
            .vhosts
            .get(vhost)
            .ok_or_else(|| exchange_missing(vhost, exchange))?;
        let ex = vh
            .exchanges
            .get(exchange)
            .ok_or_else(|| exchange_missing(vhost, exchange))?;
        if ex.internal {
            return Err(AmqpError::access_refused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{vhost}'"
            )));
        }
        let mut routed = Routed::default();
        if exchange.is_empty() {
            if vh.queues.contains_key(routing_key) {
                routed.queues.insert(routing_key.to_owned());
            }
            return Ok(routed);
        }
        let key_words = topic_words(routing_key);
        let mut visited: BTreeSet<&str> = BTreeSet::new();
        let mut pending: Vec<&str> = vec![exchange];
        while let Some(name) = pending.pop() {
            if !visited.insert(name) {
                continue;
            }
            let Some(ex) = vh.exchanges.get(name) else {
                continue;
            };
            let mut matched = false;
            if let Some(set) = vh.bindings.get(name) {
                let mut deliver = |b: &Binding| {
                    matched = true;
                    match &b.destination {
                        Destination::Queue(q) => {
                            routed.queues.insert(q.clone());
                        }
                        Destination::Exchange(e) => {
                            if let Some((key, _)) = vh.exchanges.get_key_value(e) {
                                pending.push(key.as_str());
                            }
                        }
                    }
                };
                match ex.kind {
                    ExchangeKind::Direct => {
                        if let Some(idx) = set.index.by_key.get(routing_key) {
                            for i in idx {
                                deliver(&set.bindings[*i]);
                            }
                        }
                    }
                    ExchangeKind::Fanout => set.bindings.iter().for_each(&mut deliver),
                    ExchangeKind::Topic => {
                        for (pattern, i) in &set.index.topics {
                            if pattern.matches(&key_words) {
                                deliver(&set.bindings[*i]);
                            }
                        }
                    }
                    ExchangeKind::Headers => {
                        for b in &set.bindings {
                            if headers_match(&b.arguments, headers) {
                                deliver(b);
                            }
                        }
                    }
                }
            }
            // RabbitMQ hands a message its exchange could not route to the exchange's
            // alternate exchange.
            let alternate = ex
                .arguments
                .get("alternate-exchange")
                .and_then(|v| v.as_str());
            if let (false, Some(alt)) = (matched, alternate)
                && let Some((alt_name, _)) = vh.exchanges.get_key_value(alt)
            {
                pending.push(alt_name.as_str());
            }
        }
        Ok(routed)
    }

    /// Applies one committed command. Deterministic: the same state and command give the same
    /// result on every replica.
    pub fn apply(&mut self, cmd: MetaCmd) -> (MetaReply, Vec<MetaEffect>) {
        let mut effects = Vec::new();
        let reply = match cmd {
            MetaCmd::DeclareExchange(decl) => self.declare_exchange(decl),
            MetaCmd::DeleteExchange {
                vhost,
                name,
                if_unused,
            } => self.delete_exchange(&vhost, &name, if_unused, &mut effects),
            MetaCmd::DeclareQueue(decl) => self.declare_queue(decl, &mut effects),
            MetaCmd::DeleteQueue { vhost, name, by } => {
                match self.vhosts.get(&vhost).and_then(|v| v.queues.get(&name)) {
                    None => Ok(MetaReply::Done),
                    Some(q) if q.exclusive_owner.is_some() && q.exclusive_owner != by => {
                        Err(locked(&vhost, &name))
                    }
                    Some(_) => {
                        self.remove_queue(&vhost, &name, &mut effects);
                        Ok(MetaReply::Done)
                    }
                }
            }
            MetaCmd::Bind(decl) => self.bind(decl),
            MetaCmd::Unbind(decl) => self.unbind(decl, &mut effects),
            MetaCmd::NodeDown { node } => {
                self.remove_queues_where(&mut effects, |q| {
                    q.exclusive_owner.is_some_and(|o| o.run.node == node)
                });
                Ok(MetaReply::Done)
            }
            MetaCmd::ConnectionClosed { conn } => {
                self.remove_queues_where(&mut effects, |q| q.exclusive_owner == Some(conn));
                Ok(MetaReply::Done)
            }
            MetaCmd::TxDecide { tx, commit } => Ok(MetaReply::TxDecided {
                commit: *self.tx_decisions.entry(tx).or_insert(commit),
            }),
            MetaCmd::TxForget { tx } => {
                self.tx_decisions.remove(&tx);
                Ok(MetaReply::Done)
            }
            MetaCmd::SetReplicas {
                vhost,
                name,
                replicas,
            } => self.set_replicas(&vhost, &name, replicas, &mut effects),
            MetaCmd::NodeRestarted { run } => {
                self.remove_queues_where(&mut effects, |q| match q.placement {
                    Placement::Local { run: owner } => {
                        owner.node == run.node && owner.incarnation < run.incarnation
                    }
                    Placement::Replicated { .. } => false,
                });
                let stale: Vec<(String, String)> = self
                    .exchanges()
                    .filter(|(_, e)| {
                        e.declared_by
                            .is_some_and(|d| d.node == run.node && d.incarnation < run.incarnation)
                    })
                    .map(|(v, e)| (v.to_owned(), e.name.clone()))
                    .collect();
                for (vhost, name) in stale {
                    self.remove_exchange(&vhost, &name, &mut effects);
                }
                Ok(MetaReply::Done)
            }
            MetaCmd::AddVhost { name } => {
                if name.is_empty() || name.len() > 255 {
                    Err(AmqpError::precondition_failed(
                        "a vhost name must have 1 to 255 bytes",
                    ))
                } else {
                    self.add_vhost(&name);
                    Ok(MetaReply::Done)
                }
            }
            MetaCmd::DeleteVhost { name } => {
                if self.vhosts.contains_key(&name) {
                    self.remove_queues_where_in(&name, &mut effects);
                    self.vhosts.remove(&name);
                    self.permissions.retain(|(_, v), _| *v != name);
                    self.policies.retain(|(v, _), _| *v != name);
                    Ok(MetaReply::Done)
                } else {
                    Err(AmqpError::not_found(format!("no vhost '{name}'")))
                }
            }
            MetaCmd::PutUser {
                name,
                password_hash,
                tags,
            } => {
                if name.is_empty() {
                    Err(AmqpError::precondition_failed("a user needs a name"))
                } else {
                    self.users.insert(
                        name.clone(),
                        UserDef {
                            name,
                            password_hash,
                            tags,
                        },
                    );
                    Ok(MetaReply::Done)
                }
            }
            MetaCmd::DeleteUser { name } => {
                if self.users.remove(&name).is_some() {
                    self.permissions.retain(|(u, _), _| *u != name);
                    Ok(MetaReply::Done)
                } else {
                    Err(AmqpError::not_found(format!("no user '{name}'")))
                }
            }
            MetaCmd::SetPermissions {
                user,
                vhost,
                permissions,
            } => {
                if !self.vhosts.contains_key(&vhost) {
                    Err(AmqpError::not_found(format!("no vhost '{vhost}'")))
                } else {
                    self.permissions.insert((user, vhost), permissions);
                    Ok(MetaReply::Done)
                }
            }
            MetaCmd::ClearPermissions { user, vhost } => {
                self.permissions.remove(&(user, vhost));
                Ok(MetaReply::Done)
            }
            MetaCmd::SetPolicy { vhost, policy } => {
                if !self.vhosts.contains_key(&vhost) {
                    Err(AmqpError::not_found(format!("no vhost '{vhost}'")))
                } else if let Err(e) = policy.validate() {
                    Err(e)
                } else {
                    self.policies
                        .insert((vhost.clone(), policy.name.clone()), policy);
                    self.announce_arguments(&vhost, &mut effects);
                    Ok(MetaReply::Done)
                }
            }
            MetaCmd::ClearPolicy { vhost, name } => {
                if self
                    .policies
                    .remove(&(vhost.clone(), name.clone()))
                    .is_some()
                {
                    self.announce_arguments(&vhost, &mut effects);
                    Ok(MetaReply::Done)
                } else {
                    Err(AmqpError::not_found(format!(
                        "no policy '{name}' in vhost '{vhost}'"
                    )))
                }
            }
        };
        (reply.unwrap_or_else(MetaReply::Error), effects)
    }

    fn set_replicas(
        &mut self,
        vhost: &str,
        name: &str,
        replicas: Vec<NodeId>,
        effects: &mut Vec<MetaEffect>,
    ) -> AmqpResult<MetaReply> {
        let mut unique = Vec::with_capacity(replicas.len());
        for r in replicas {
            if !unique.contains(&r) {
                unique.push(r);
            }
        }
        if unique.is_empty() {
            return Err(AmqpError::precondition_failed(
                "a replicated queue needs at least one replica",
            ));
        }
        let queue = self
            .vhosts
            .get_mut(vhost)
            .and_then(|v| v.queues.get_mut(name))
            .ok_or_else(|| queue_missing(vhost, name))?;
        let Placement::Replicated { replicas, .. } = &mut queue.placement else {
            return Err(AmqpError::precondition_failed(format!(
                "queue '{name}' in vhost '{vhost}' is not replicated"
            )));
        };
        if *replicas != unique {
            *replicas = unique;
            effects.push(MetaEffect::ReplicasChanged {
                vhost: vhost.to_owned(),
                queue: queue.clone(),
            });
        }
        Ok(MetaReply::Done)
    }

    /// How many replicated queues each node holds a replica of, and leads by preference;
    /// placement and rebalancing read it.
    pub fn replica_counts(&self) -> BTreeMap<NodeId, (usize, usize)> {
        let mut counts: BTreeMap<NodeId, (usize, usize)> = BTreeMap::new();
        for (_, q) in self.queues() {
            if let Placement::Replicated { replicas, .. } = &q.placement {
                for (i, r) in replicas.iter().enumerate() {
                    let c = counts.entry(*r).or_default();
                    c.0 += 1;
                    if i == 0 {
                        c.1 += 1;
                    }
                }
            }
        }
        counts
    }

    fn vhost_mut(&mut self, vhost: &str) -> AmqpResult<&mut VHost> {
        self.vhosts.get_mut(vhost).ok_or_else(|| {
            AmqpError::new(
                warren_codec::reply_code::NOT_ALLOWED,
                format!("vhost '{vhost}' not found"),
            )
        })
    }

    fn declare_exchange(&mut self, decl: ExchangeDecl) -> AmqpResult<MetaReply> {
        let kind = ExchangeKind::parse(&decl.kind).ok_or_else(|| {
            AmqpError::command_invalid(format!("invalid exchange type '{}'", decl.kind))
        })?;
        if decl.name.is_empty() {
            return Err(default_exchange_refused());
        }
        let vhost_name = decl.vhost.clone();
        let vh = self.vhost_mut(&decl.vhost)?;
        if let Some(existing) = vh.exchanges.get(&decl.name) {
            let check = |arg: &str, got: String, cur: String| {
                inequivalent("exchange", arg, &decl.name, &vhost_name, got, cur)
            };
            if existing.kind != kind {
                return Err(check(
                    "type",
                    format!("'{}'", kind.as_str()),
                    format!("'{}'", existing.kind.as_str()),
                ));
            }
            if existing.durable != decl.durable {
                return Err(check(
                    "durable",
                    format!("'{}'", decl.durable),
                    format!("'{}'", existing.durable),
                ));
            }
            if existing.auto_delete != decl.auto_delete {
                return Err(check(
                    "auto_delete",
                    format!("'{}'", decl.auto_delete),
                    format!("'{}'", existing.auto_delete),
                ));
            }
            if existing.internal != decl.internal {
                return Err(check(
                    "internal",
                    format!("'{}'", decl.internal),
                    format!("'{}'", existing.internal),
                ));
            }
            args_equivalent(
                EXCHANGE_EQUIVALENCE_ARGS,
                &existing.arguments,
                &decl.arguments,
            )
            .map_err(|(arg, got, cur)| check(&arg, got, cur))?;
            return Ok(MetaReply::Done);
        }
        if decl.name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                decl.name
            )));
        }
        let declared_by = (!decl.durable).then_some(decl.declared_by);
        vh.exchanges.insert(
            decl.name.clone(),
            ExchangeDef {
                name: decl.name,
                kind,
                durable: decl.durable,
                auto_delete: decl.auto_delete,
                internal: decl.internal,
                arguments: decl.arguments,
                declared_by,
            },
        );
        Ok(MetaReply::Done)
    }

    fn delete_exchange(
        &mut self,
        vhost: &str,
        name: &str,
        if_unused: bool,
        effects: &mut Vec<MetaEffect>,
    ) -> AmqpResult<MetaReply> {
        if name.is_empty() || name.starts_with("amq.") {
            if name.is_empty() {
                return Err(default_exchange_refused());
            }
            if self.exchange(vhost, name).is_some() {
                return Err(AmqpError::access_refused(format!(
                    "exchange '{name}' in vhost '{vhost}' is predeclared and cannot be deleted"
                )));
            }
        }
        let vh = self.vhost_mut(vhost)?;
        if !vh.exchanges.contains_key(name) {
            // RabbitMQ made delete idempotent: a missing exchange is not an error.
            return Ok(MetaReply::Done);
        }
        if if_unused
            && vh
                .bindings
                .get(name)
                .is_some_and(|s| !s.bindings.is_empty())
        {
            return Err(AmqpError::precondition_failed(format!(
                "exchange '{name}' in vhost '{vhost}' in use"
            )));
        }
        self.remove_exchange(vhost, name, effects);
        Ok(MetaReply::Done)
    }

    fn remove_exchange(&mut self, vhost: &str, name: &str, effects: &mut Vec<MetaEffect>) {
        let Some(vh) = self.vhosts.get_mut(vhost) else {
            return;
        };
        vh.exchanges.remove(name);
        vh.bindings.remove(name);
        let dest = Destination::Exchange(name.to_owned());
        let sources = remove_bindings_to(vh, &dest);
        self.auto_delete_exchanges(vhost, sources, effects);
    }

    fn declare_queue(
        &mut self,
        decl: QueueDecl,
        effects: &mut Vec<MetaEffect>,
    ) -> AmqpResult<MetaReply> {
        let next_group = self.next_group;
        let vhost_name = decl.vhost.clone();
        let vh = self.vhost_mut(&decl.vhost)?;
        if let Some(existing) = vh.queues.get(&decl.name) {
            if existing.exclusive_owner.is_some()
                && existing.exclusive_owner != decl.exclusive_owner
            {
                return Err(locked(&vhost_name, &decl.name));
            }
            let check = |arg: &str, got: bool, cur: bool| {
                inequivalent(
                    "queue",
                    arg,
                    &decl.name,
                    &vhost_name,
                    format!("'{got}'"),
                    format!("'{cur}'"),
                )
            };
            if existing.durable != decl.durable {
                return Err(check("durable", decl.durable, existing.durable));
            }
            if existing.exclusive_owner.is_some() != decl.exclusive_owner.is_some() {
                return Err(check(
                    "exclusive",
                    decl.exclusive_owner.is_some(),
                    existing.exclusive_owner.is_some(),
                ));
            }
            if existing.auto_delete != decl.auto_delete {
                return Err(check("auto_delete", decl.auto_delete, existing.auto_delete));
            }
            args_equivalent(QUEUE_EQUIVALENCE_ARGS, &existing.arguments, &decl.arguments).map_err(
                |(arg, got, cur)| inequivalent("queue", &arg, &decl.name, &vhost_name, got, cur),
            )?;
            return Ok(MetaReply::QueueDeclared {
                created: false,
                queue: existing.clone(),
            });
        }
        if decl.name.starts_with("amq.") && !decl.name.starts_with("amq.gen-") {
            return Err(AmqpError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                decl.name
            )));
        }
        let replicated = decl.durable && decl.exclusive_owner.is_none();
        let placement = if replicated {
            Placement::Replicated {
                group: next_group,
                replicas: decl.replicas.clone(),
            }
        } else {
            Placement::Local {
                run: decl.declared_by,
            }
        };
        let queue = QueueDef {
            id: next_group,
            name: decl.name.clone(),
            durable: decl.durable,
            exclusive_owner: decl.exclusive_owner,
            auto_delete: decl.auto_delete,
            arguments: decl.arguments,
            placement,
        };
        vh.queues.insert(decl.name, queue.clone());
        self.next_group += 1;
        effects.push(MetaEffect::QueueCreated {
            vhost: vhost_name.clone(),
            queue: queue.clone(),
        });
        if self.policy_for(&vhost_name, &queue.name).is_some() {
            self.policy_version += 1;
            effects.push(MetaEffect::QueueArguments {
                arguments: self.effective_arguments(&vhost_name, &queue),
                vhost: vhost_name,
                name: queue.name.clone(),
                version: self.policy_version,
            });
        }
        Ok(MetaReply::QueueDeclared {
            created: true,
            queue,
        })
    }

    /// The policy that applies to a queue: the matching one with the highest priority (by
    /// name among equals).
    pub fn policy_for(&self, vhost: &str, queue: &str) -> Option<&Policy> {
        self.policies
            .iter()
            .filter(|((v, _), p)| v == vhost && p.applies_to_queue(queue))
            .map(|(_, p)| p)
            .max_by(|a, b| a.priority.cmp(&b.priority).then(b.name.cmp(&a.name)))
    }

    pub fn policies(&self) -> impl Iterator<Item = (&str, &Policy)> {
        self.policies.iter().map(|((v, _), p)| (v.as_str(), p))
    }

    /// The arguments in force for a queue: its policy's, translated to queue arguments, with
    /// the queue's own arguments over them.
    pub fn effective_arguments(&self, vhost: &str, queue: &QueueDef) -> FieldTable {
        let Some(policy) = self.policy_for(vhost, &queue.name) else {
            return queue.arguments.clone();
        };
        let mut args = FieldTable::new();
        for (key, value) in policy.definition.iter() {
            if let Some((_, arg)) = POLICY_KEYS.iter().find(|(k, _)| *k == key.as_str()) {
                args.insert(ShortStr::from_static(arg), value.clone());
            }
        }
        for (key, value) in queue.arguments.iter() {
            args.insert(key.clone(), value.clone());
        }
        args
    }

    /// Tells the adapter the arguments in force for every queue of a vhost.
    fn announce_arguments(&mut self, vhost: &str, effects: &mut Vec<MetaEffect>) {
        self.policy_version += 1;
        let Some(vh) = self.vhosts.get(vhost) else {
            return;
        };
        for queue in vh.queues.values() {
            effects.push(MetaEffect::QueueArguments {
                vhost: vhost.to_owned(),
                name: queue.name.clone(),
                arguments: self.effective_arguments(vhost, queue),
                version: self.policy_version,
            });
        }
    }

    /// The version of the arguments policies put in force now (see `MetaEffect::QueueArguments`).
    pub fn policy_version(&self) -> u64 {
        self.policy_version
    }

    fn remove_queues_where_in(&mut self, vhost: &str, effects: &mut Vec<MetaEffect>) {
        let names: Vec<String> = self
            .vhosts
            .get(vhost)
            .map(|v| v.queues.keys().cloned().collect())
            .unwrap_or_default();
        for name in names {
            self.remove_queue(vhost, &name, effects);
        }
    }

    fn remove_queues_where(
        &mut self,
        effects: &mut Vec<MetaEffect>,
        doomed: impl Fn(&QueueDef) -> bool,
    ) {
        let victims: Vec<(String, String)> = self
            .queues()
            .filter(|(_, q)| doomed(q))
            .map(|(v, q)| (v.to_owned(), q.name.clone()))
            .collect();
        for (vhost, name) in victims {
            self.remove_queue(&vhost, &name, effects);
        }
    }

    fn remove_queue(&mut self, vhost: &str, name: &str, effects: &mut Vec<MetaEffect>) {
        let Some(vh) = self.vhosts.get_mut(vhost) else {
            return;
        };
        let Some(queue) = vh.queues.remove(name) else {
            return;
        };
        let sources = remove_bindings_to(vh, &Destination::Queue(name.to_owned()));
        effects.push(MetaEffect::QueueDeleted {
            vhost: vhost.to_owned(),
            queue,
        });
        self.auto_delete_exchanges(vhost, sources, effects);
    }

    /// Auto-delete exchanges go when they lose their last binding as a source; removing one
    /// can empty another, so this cascades.
    fn auto_delete_exchanges(
        &mut self,
        vhost: &str,
        candidates: Vec<String>,
        effects: &mut Vec<MetaEffect>,
    ) {
        for name in candidates {
            let Some(vh) = self.vhosts.get(vhost) else {
                return;
            };
            let unused = vh.bindings.get(&name).is_none_or(|s| s.bindings.is_empty());
            if unused && vh.exchanges.get(&name).is_some_and(|e| e.auto_delete) {
                self.remove_exchange(vhost, &name, effects);
            }
        }
    }

    fn check_binding_ends(&self, decl: &BindingDecl) -> AmqpResult<()> {
        let vhost = &decl.vhost;
        if decl.source.is_empty() || decl.destination == Destination::Exchange(String::new()) {
            return Err(default_exchange_refused());
        }
        match &decl.destination {
            Destination::Queue(q) => {
                self.check_queue_access(vhost, q, decl.by)?;
            }
            Destination::Exchange(e) => {
                if self.exchange(vhost, e).is_none() {
                    return Err(exchange_missing(vhost, e));
                }
            }
        }
        if self.exchange(vhost, &decl.source).is_none() {
            return Err(exchange_missing(vhost, &decl.source));
        }
        Ok(())
    }

    fn bind(&mut self, decl: BindingDecl) -> AmqpResult<MetaReply> {
        self.check_binding_ends(&decl)?;
        if self
            .exchange(&decl.vhost, &decl.source)
            .is_some_and(|e| e.kind == ExchangeKind::Headers)
        {
            validate_headers_binding(&decl.arguments).map_err(AmqpError::precondition_failed)?;
        }
        let vh = self.vhost_mut(&decl.vhost)?;
        let set = vh.bindings.entry(decl.source.clone()).or_default();
        let binding = Binding {
            source: decl.source,
            destination: decl.destination,
            routing_key: decl.routing_key,
            arguments: decl.arguments,
        };
        if !set.bindings.contains(&binding) {
            set.bindings.push(binding);
            set.rebuild();
        }
        Ok(MetaReply::Done)
    }

    /// Unbinding is idempotent, as in RabbitMQ: a missing binding, exchange or queue is not an
    /// error. Exclusivity and the default exchange still are.
    fn unbind(
        &mut self,
        decl: BindingDecl,
        effects: &mut Vec<MetaEffect>,
    ) -> AmqpResult<MetaReply> {
        match self.check_binding_ends(&decl) {
            Err(e) if e.code == reply_code::NOT_FOUND => return Ok(MetaReply::Done),
            other => other?,
        }
        let vh = self.vhost_mut(&decl.vhost)?;
        let Some(set) = vh.bindings.get_mut(&decl.source) else {
            return Ok(MetaReply::Done);
        };
        let before = set.bindings.len();
        set.bindings.retain(|b| {
            !(b.destination == decl.destination
                && b.routing_key == decl.routing_key
                && b.arguments == decl.arguments)
        });
        if set.bindings.len() != before {
            set.rebuild();
            if set.bindings.is_empty() {
                vh.bindings.remove(&decl.source);
                self.auto_delete_exchanges(&decl.vhost, vec![decl.source], effects);
            }
        }
        Ok(MetaReply::Done)
    }

    pub fn describe_destination(d: &Destination) -> String {
        d.describe()
    }
}

/// Drops every binding to `dest` and returns the sources that lost one (auto-delete candidates).
fn remove_bindings_to(vh: &mut VHost, dest: &Destination) -> Vec<String> {
    let mut touched = Vec::new();
    vh.bindings.retain(|source, set| {
        let before = set.bindings.len();
        set.bindings.retain(|b| &b.destination != dest);
        if set.bindings.len() != before {
            touched.push(source.clone());
            set.rebuild();
        }
        !set.bindings.is_empty()
    });
    touched
}

#[cfg(test)]
#[path = "meta_tests.rs"]
mod tests;
