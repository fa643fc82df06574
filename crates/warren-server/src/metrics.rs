//! Broker-wide counters and their Prometheus text rendering for `/metrics`.
//!
//! Connections bump the counters with relaxed atomics (cheap on the publish path); the HTTP
//! module (`http`) renders them together with per-queue figures read from the node's queue
//! handles and the storage's group-commit statistics.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use warren_cluster::Node;

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub connections_opened: AtomicU64,
    pub channels: AtomicU64,
    pub published: AtomicU64,
    pub unroutable: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub nacked: AtomicU64,
    pub settlement_commands: AtomicU64,
    pub auth_failures: AtomicU64,
    pub frames_in: AtomicU64,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn render(&self, node: &Node) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        metric(
            "warren_connections",
            "gauge",
            "Open AMQP connections.",
            get(&self.connections),
        );
        metric(
            "warren_connections_opened_total",
            "counter",
            "AMQP connections accepted.",
            get(&self.connections_opened),
        );
        metric(
            "warren_channels",
            "gauge",
            "Open AMQP channels.",
            get(&self.channels),
        );
        metric(
            "warren_published_total",
            "counter",
            "Messages published by clients.",
            get(&self.published),
        );
        metric(
            "warren_unroutable_total",
            "counter",
            "Published messages that matched no queue.",
            get(&self.unroutable),
        );
        metric(
            "warren_delivered_total",
            "counter",
            "Messages delivered to consumers or fetched with basic.get.",
            get(&self.delivered),
        );
        metric(
            "warren_acked_total",
            "counter",
            "Deliveries acknowledged by clients.",
            get(&self.acked),
        );
        metric(
            "warren_nacked_total",
            "counter",
            "Deliveries rejected or nacked by clients.",
            get(&self.nacked),
        );
        metric(
            "warren_settlement_commands_total",
            "counter",
            "Settlement commands (acks, nacks, rejects) sent to queues; a run of acks of one channel read together is one command per queue.",
            get(&self.settlement_commands),
        );
        metric(
            "warren_auth_failures_total",
            "counter",
            "Refused logins.",
            get(&self.auth_failures),
        );
        metric(
            "warren_frames_received_total",
            "counter",
            "AMQP frames received.",
            get(&self.frames_in),
        );
        let flush = node.storage().flush_stats();
        metric(
            "warren_storage_fsyncs_total",
            "counter",
            "Journal fsyncs (each shared by every group's pending writes).",
            flush.fsyncs,
        );
        metric(
            "warren_storage_fsync_errors_total",
            "counter",
            "Failed journal fsyncs.",
            flush.fsync_errors,
        );
        metric(
            "warren_storage_synced_writes_total",
            "counter",
            "Durable writes completed by the group-commit flusher.",
            flush.callbacks_completed,
        );

        let mut handles = node.queue_handles();
        handles.sort_by_key(|h| (h.vhost().to_owned(), h.name()));
        let (mut ready, mut unacked) = (0, 0);
        let mut per_queue = String::new();
        for kind in ["ready", "unacked", "consumers"] {
            let name = match kind {
                "consumers" => "warren_queue_consumers".to_owned(),
                k => format!("warren_queue_messages_{k}"),
            };
            let _ = writeln!(
                per_queue,
                "# HELP {name} Per-queue {kind} count.\n# TYPE {name} gauge"
            );
            for h in &handles {
                let s = h.stats();
                let v = match kind {
                    "ready" => s.ready,
                    "unacked" => s.unacked,
                    _ => s.consumers,
                };
                let _ = writeln!(
                    per_queue,
                    "{name}{{vhost=\"{}\",queue=\"{}\"}} {v}",
                    escape(h.vhost()),
                    escape(&h.name())
                );
            }
        }
        for h in &handles {
            let s = h.stats();
            ready += s.ready;
            unacked += s.unacked;
        }
        metric(
            "warren_queues",
            "gauge",
            "Queues held by this node.",
            handles.len() as u64,
        );
        metric(
            "warren_messages_ready",
            "gauge",
            "Messages ready for delivery.",
            ready,
        );
        metric(
            "warren_messages_unacked",
            "gauge",
            "Messages delivered and not yet acknowledged.",
            unacked,
        );
        out.push_str(&per_queue);
        out
    }
}
