//! What every connection of a node shares: configuration, users, the cluster node, metrics,
//! the table of open connections and the shutdown signal.
//!
//! `main` builds one `Broker`; `connection` reads it for limits and the connection.start
//! properties, and `http` for readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::watch;
use warren_cluster::{ClusterError, Node, QueueOutcome};
use warren_codec::{ConnectionStart, FieldTable, FieldValue, LongStr, ShortStr};
use warren_core::AmqpError;
use warren_core::ConnectionRef;
use warren_core::meta::{MetaCmd, QueueDecl};
use warren_core::queue::{QueueCmd, QueueConfig};

use crate::auth::{Authenticator, MECHANISMS};
use crate::config::Config;
use crate::connections::Connections;
use crate::metrics::Metrics;
use crate::rates::Rates;

pub struct Broker {
    pub config: Config,
    pub auth: Authenticator,
    pub node: Arc<Node>,
    pub metrics: Arc<Metrics>,
    /// The client connections open on this node (management API).
    pub connections: Arc<Connections>,
    /// Message rates as last sampled (management API).
    pub rates: Arc<Rates>,
    /// Flips to true once: every connection then closes with 320 CONNECTION_FORCED.
    pub shutdown: watch::Sender<bool>,
    pub ready: AtomicBool,
    next_conn: AtomicU64,
}

/// How a queue is declared, apart from its name and arguments.
#[derive(Clone, Copy, Debug, Default)]
pub struct QueueOptions {
    pub durable: bool,
    pub auto_delete: bool,
    pub exclusive_owner: Option<ConnectionRef>,
}

/// How many replicas a new replicated queue gets: RabbitMQ's `x-quorum-initial-group-size`,
/// else the configured default.
fn replica_count(arguments: &FieldTable, default: usize) -> usize {
    arguments
        .get("x-quorum-initial-group-size")
        .and_then(FieldValue::as_i64)
        .filter(|n| *n > 0)
        .map_or(default, |n| usize::try_from(n).unwrap_or(default))
}

fn key(s: &'static str) -> ShortStr {
    ShortStr::from_static(s)
}

impl Broker {
    pub fn new(config: Config, node: Arc<Node>) -> Arc<Self> {
        let auth = Authenticator::new(&config.users, &config.loopback_users);
        let (shutdown, _) = watch::channel(false);
        Arc::new(Broker {
            config,
            auth,
            node,
            metrics: Arc::new(Metrics::default()),
            connections: Arc::new(Connections::default()),
            rates: Arc::new(Rates::default()),
            shutdown,
            ready: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        })
    }

    /// The metadata command that declares a queue as asked, by AMQP or the management API.
    /// Arguments RabbitMQ refuses (a negative TTL, an unknown overflow mode...) are refused
    /// here, with its 406, before anything is created.
    pub fn queue_declaration(
        &self,
        vhost: &str,
        name: &str,
        options: QueueOptions,
        arguments: FieldTable,
    ) -> Result<MetaCmd, AmqpError> {
        QueueConfig::from_arguments(&arguments)?;
        let replicas = self.node.replica_set(
            replica_count(&arguments, self.config.default_replicas),
            arguments
                .get("x-queue-leader-locator")
                .and_then(FieldValue::as_str)
                == Some("balanced"),
        );
        Ok(MetaCmd::DeclareQueue(QueueDecl {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
            durable: options.durable,
            exclusive_owner: options.exclusive_owner,
            auto_delete: options.auto_delete,
            arguments,
            declared_by: self.node.run(),
            replicas,
        }))
    }

    /// A declaration is a use: it starts (or restarts) the queue's `x-expires` clock, whether
    /// the queue or its policy sets one. The command is submitted now; waiting for its answer
    /// (the returned future) is up to the caller.
    pub fn touch_on_declare(
        &self,
        vhost: &str,
        name: &str,
    ) -> Option<impl std::future::Future<Output = Result<QueueOutcome, ClusterError>> + use<>> {
        let handle = self.node.queue(vhost, name)?;
        handle
            .arguments()
            .get("x-expires")
            .is_some()
            .then(|| handle.call(QueueCmd::Touch, None))
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// connection.start as RabbitMQ clients expect it: the capabilities table decides which
    /// extensions they use (confirms, consumer cancel notifications, ...).
    pub fn connection_start(&self) -> ConnectionStart {
        let mut caps = FieldTable::new();
        for cap in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "authentication_failure_close",
            "per_consumer_qos",
        ] {
            caps.insert(key(cap), FieldValue::Bool(true));
        }
        let mut props = FieldTable::new();
        props.insert(key("capabilities"), FieldValue::Table(caps));
        props.insert(key("product"), FieldValue::LongStr(LongStr::from("Warren")));
        props.insert(
            key("version"),
            FieldValue::LongStr(LongStr::from(env!("CARGO_PKG_VERSION"))),
        );
        props.insert(key("platform"), FieldValue::LongStr(LongStr::from("Rust")));
        props.insert(
            key("information"),
            FieldValue::LongStr(LongStr::from("Raft-replicated AMQP 0-9-1 broker")),
        );
        props.insert(
            key("cluster_name"),
            FieldValue::LongStr(LongStr::from(format!("warren@{}", self.node.id()))),
        );
        ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties: props,
            mechanisms: LongStr::from(MECHANISMS),
            locales: LongStr::from("en_US"),
        }
    }
}
