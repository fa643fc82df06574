//! The client connections open on this node, as the management API lists them: who is
//! connected, from where, as whom, with how many channels, and a way to close one with
//! 320 CONNECTION_FORCED (RabbitMQ's `DELETE /api/connections/{name}`).
//!
//! `connection` registers a client once it is through the handshake and the registration
//! removes it when the connection's task ends; `management` reads the table and asks a
//! connection to close through the connection's own event queue, so the close goes through
//! the same path as a broker shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use warren_codec::FieldTable;

use crate::connection::ConnEvent;

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
}
