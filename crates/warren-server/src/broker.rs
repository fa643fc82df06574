//! What every connection of a node shares: configuration, users, the cluster node, metrics
//! and the shutdown signal.
//!
//! `main` builds one `Broker`; `connection` reads it for limits and the connection.start
//! properties, and `http` for readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::watch;
use warren_cluster::Node;
use warren_codec::{ConnectionStart, FieldTable, FieldValue, LongStr, ShortStr};

use crate::auth::{Authenticator, MECHANISMS};
use crate::config::Config;
use crate::metrics::Metrics;

pub struct Broker {
    pub config: Config,
    pub auth: Authenticator,
    pub node: Arc<Node>,
    pub metrics: Arc<Metrics>,
    /// Flips to true once: every connection then closes with 320 CONNECTION_FORCED.
    pub shutdown: watch::Sender<bool>,
    pub ready: AtomicBool,
    next_conn: AtomicU64,
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
            shutdown,
            ready: AtomicBool::new(false),
            next_conn: AtomicU64::new(1),
        })
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
