//! The client connections open on this node, as the management API lists them: who is
//! connected, from where, as whom, with how many channels, and a way to close one with
//! 320 CONNECTION_FORCED (RabbitMQ's `DELETE /api/connections/{name}`).
//!
//! `connection` registers a client once it is through the handshake and the registration
//! removes it when the connection's task ends; `management` reads the table and asks a
//! connection to close through the connection's own event queue, so the close goes through
//! the same path as a broker shutdown. Other nodes' management APIs reach this table through
//! `ConnectionService`, carried by the cluster's `Service` requests, so any node lists and
//! closes the connections of the whole cluster, as RabbitMQ's does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use warren_cluster::{NodeService, ServiceFuture};
use warren_codec::FieldTable;
use warren_core::json::table_to_json;

use crate::connection::{ConnEvent, ConnectionDetails};

/// How long a connection may take to describe its channels; one that is stuck (its client
/// not reading) is left out of the listing rather than holding it up.
const DESCRIBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the management API shows of one connection.
pub struct ConnectionInfo {
    /// RabbitMQ's form, "client address -> server address", which is also its key in the
    /// API's paths.
    pub name: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub user: String,
    pub vhost: String,
    pub tls: bool,
    pub client_properties: FieldTable,
    /// Milliseconds since the epoch.
    pub connected_at: u64,
    /// Kept current by the connection as channels open and close.
    pub channels: AtomicUsize,
    events: mpsc::UnboundedSender<ConnEvent>,
}

impl ConnectionInfo {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        peer: SocketAddr,
        local: SocketAddr,
        user: String,
        vhost: String,
        tls: bool,
        client_properties: FieldTable,
        connected_at: u64,
        events: mpsc::UnboundedSender<ConnEvent>,
    ) -> Self {
        ConnectionInfo {
            name: format!("{peer} -> {local}"),
            peer,
            local,
            user,
            vhost,
            tls,
            client_properties,
            connected_at,
            channels: AtomicUsize::new(0),
            events,
        }
    }

    pub fn channel_count(&self) -> usize {
        self.channels.load(Ordering::Relaxed)
    }

    /// The connection's channels and consumers, as the connection itself reports them.
    pub async fn describe(&self) -> Option<ConnectionDetails> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.events.send(ConnEvent::Describe { reply }).ok()?;
        tokio::time::timeout(DESCRIBE_TIMEOUT, answer)
            .await
            .ok()?
            .ok()
    }

    /// The connection as RabbitMQ's management API describes one; `node` is this node's name.
    pub fn to_json(&self, node: &str) -> Value {
        json!({
            "name": self.name,
            "node": node,
            "vhost": self.vhost,
            "user": self.user,
            "peer_host": self.peer.ip().to_string(),
            "peer_port": self.peer.port(),
            "host": self.local.ip().to_string(),
            "port": self.local.port(),
            "ssl": self.tls,
            "protocol": "AMQP 0-9-1",
            "type": "network",
            "state": "running",
            "channels": self.channel_count(),
            "connected_at": self.connected_at,
            "client_properties": table_to_json(&self.client_properties),
        })
    }
}

#[derive(Default)]
pub struct Connections {
    open: Mutex<BTreeMap<u64, Arc<ConnectionInfo>>>,
}

/// Holds a connection's entry in the table; dropping it (the connection ended) removes it.
pub struct Registration {
    table: Arc<Connections>,
    id: u64,
    pub info: Arc<ConnectionInfo>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.table.lock().remove(&self.id);
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ConnectionInfo>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, id: u64, info: ConnectionInfo) -> Registration {
        let info = Arc::new(info);
        self.lock().insert(id, info.clone());
        Registration {
            table: self.clone(),
            id,
            info,
        }
    }

    /// Open connections, oldest first.
    pub fn list(&self) -> Vec<Arc<ConnectionInfo>> {
        self.lock().values().cloned().collect()
    }

    pub fn find(&self, name: &str) -> Option<Arc<ConnectionInfo>> {
        self.lock().values().find(|c| c.name == name).cloned()
    }

    /// Asks the named connection to close with 320 CONNECTION_FORCED and `reason`. False
    /// when no such connection is open here.
    pub fn close(&self, name: &str, reason: String) -> bool {
        match self.find(name) {
            Some(c) => c.events.send(ConnEvent::ForceClose { reason }).is_ok(),
            None => false,
        }
    }
}

/// What one node's management API asks another's about its connections.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServiceRequest {
    /// Answered with the JSON list of the node's connections.
    ListConnections,
    /// Answered with the JSON list of the channels of the node's connections.
    ListChannels,
    /// Answered with the JSON list of the consumers on the node's connections.
    ListConsumers,
    /// Answered with the node's message figures (`rates::NodeFigures`).
    MessageStats,
    /// Answered with `true` when the node had the connection and asked it to close.
    CloseConnection { name: String, reason: String },
}

/// Answers other nodes' `ServiceRequest`s from this node's table.
pub struct ConnectionService {
    pub table: Arc<Connections>,
    pub rates: Arc<crate::rates::Rates>,
    pub node_name: String,
}

impl ConnectionService {
    pub async fn answer(&self, request: ServiceRequest) -> Value {
        match request {
            ServiceRequest::MessageStats => {
                serde_json::to_value(self.rates.snapshot()).unwrap_or(Value::Null)
            }
            ServiceRequest::ListChannels | ServiceRequest::ListConsumers => {
                let connections = self.table.list();
                let details =
                    futures::future::join_all(connections.iter().map(|c| c.describe())).await;
                let pick = |d: ConnectionDetails| match request {
                    ServiceRequest::ListChannels => d.channels,
                    _ => d.consumers,
                };
                Value::Array(details.into_iter().flatten().flat_map(pick).collect())
            }
            ServiceRequest::ListConnections => Value::Array(
                self.table
                    .list()
                    .iter()
                    .map(|c| c.to_json(&self.node_name))
                    .collect(),
            ),
            ServiceRequest::CloseConnection { name, reason } => {
                Value::Bool(self.table.close(&name, reason))
            }
        }
    }
}

impl NodeService for ConnectionService {
    fn handle(&self, payload: Vec<u8>) -> ServiceFuture {
        let service = ConnectionService {
            table: self.table.clone(),
            rates: self.rates.clone(),
            node_name: self.node_name.clone(),
        };
        Box::pin(async move {
            let request = serde_json::from_slice::<ServiceRequest>(&payload)
                .map_err(|e| format!("not a connection request: {e}"))?;
            serde_json::to_vec(&service.answer(request).await).map_err(|e| e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(port: u16, events: mpsc::UnboundedSender<ConnEvent>) -> ConnectionInfo {
        ConnectionInfo::new(
            format!("127.0.0.1:{port}").parse().unwrap(),
            "127.0.0.1:5672".parse().unwrap(),
            "guest".into(),
            "/".into(),
            false,
            FieldTable::new(),
            0,
            events,
        )
    }

    #[test]
    fn an_entry_lives_as_long_as_its_registration() {
        let table = Arc::new(Connections::default());
        let (tx, _rx) = mpsc::unbounded_channel();
        let first = table.register(1, info(40001, tx.clone()));
        let second = table.register(2, info(40002, tx));
        let names: Vec<String> = table.list().iter().map(|c| c.name.clone()).collect();
        assert_eq!(
            names,
            [
                "127.0.0.1:40001 -> 127.0.0.1:5672",
                "127.0.0.1:40002 -> 127.0.0.1:5672"
            ]
        );
        drop(first);
        assert!(table.find("127.0.0.1:40001 -> 127.0.0.1:5672").is_none());
        assert!(table.find(&second.info.name).is_some());
    }

    #[test]
    fn closing_sends_the_reason_to_that_connection_only() {
        let table = Arc::new(Connections::default());
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let (tx2, mut rx2) = mpsc::unbounded_channel();
        let _a = table.register(1, info(40001, tx1));
        let _b = table.register(2, info(40002, tx2));
        assert!(table.close("127.0.0.1:40002 -> 127.0.0.1:5672", "maintenance".into()));
        assert!(matches!(
            rx2.try_recv(),
            Ok(ConnEvent::ForceClose { reason }) if reason == "maintenance"
        ));
        assert!(rx1.try_recv().is_err());
        assert!(!table.close("127.0.0.1:1 -> 127.0.0.1:5672", "x".into()));
    }

    #[tokio::test]
    async fn the_service_answers_other_nodes_from_the_table() {
        let table = Arc::new(Connections::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _a = table.register(1, info(40001, tx));
        let service = ConnectionService {
            table,
            rates: Arc::default(),
            node_name: "warren@3".into(),
        };
        let ask = |request: &ServiceRequest| service.handle(serde_json::to_vec(request).unwrap());
        let list: Value =
            serde_json::from_slice(&ask(&ServiceRequest::ListConnections).await.unwrap()).unwrap();
        assert_eq!(list[0]["node"], "warren@3");
        assert_eq!(list[0]["peer_port"], 40001);
        let close = ServiceRequest::CloseConnection {
            name: "127.0.0.1:40001 -> 127.0.0.1:5672".into(),
            reason: "bye".into(),
        };
        let closed: Value = serde_json::from_slice(&ask(&close).await.unwrap()).unwrap();
        assert_eq!(closed, Value::Bool(true));
        assert!(matches!(rx.try_recv(), Ok(ConnEvent::ForceClose { .. })));
        assert!(service.handle(b"nonsense".to_vec()).await.is_err());
    }
}
