//! Message rates for the management API, in RabbitMQ's `message_stats` shape: how many
//! messages were published, delivered or fetched, and acknowledged, with their rate per
//! second over the last sampling interval (5 s, RabbitMQ's default), for the node and per
//! queue.
//!
//! `connection` counts into `Metrics` (node totals) and into each queue handle's `Traffic`
//! (per queue, this node's clients only); the task here samples both every interval.
//! `connections::ConnectionService` hands this node's figures to whichever node's management
//! API asks, and `management` adds up the nodes, since a queue's clients may be on any node.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use warren_cluster::Node;

use crate::metrics::Metrics;

pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Counts and rates (per second) of one queue, one node, or the sum of several.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    pub publish: u64,
    pub deliver_get: u64,
    pub ack: u64,
    pub publish_rate: f64,
    pub deliver_get_rate: f64,
    pub ack_rate: f64,
}

impl Figures {
    /// The figures after an interval of `secs` in which the counters went from `self`'s
    /// counts to `now` (publish, deliver_get, ack). A counter that went back (a queue deleted
    /// and declared again under the same id cannot happen, but a restart of counting can)
    /// gives a rate of zero, never a negative one.
    pub fn next(&self, now: (u64, u64, u64), secs: f64) -> Figures {
        let rate = |before: u64, after: u64| {
            if secs > 0.0 {
                after.saturating_sub(before) as f64 / secs
            } else {
                0.0
            }
        };
        Figures {
            publish: now.0,
            deliver_get: now.1,
            ack: now.2,
            publish_rate: rate(self.publish, now.0),
            deliver_get_rate: rate(self.deliver_get, now.1),
            ack_rate: rate(self.ack, now.2),
        }
    }

    pub fn add(&mut self, other: &Figures) {
        self.publish += other.publish;
        self.deliver_get += other.deliver_get;
        self.ack += other.ack;
        self.publish_rate += other.publish_rate;
        self.deliver_get_rate += other.deliver_get_rate;
        self.ack_rate += other.ack_rate;
    }

    /// RabbitMQ's `message_stats` object.
    pub fn to_json(self) -> Value {
        json!({
            "publish": self.publish,
            "publish_details": {"rate": self.publish_rate},
            "deliver_get": self.deliver_get,
            "deliver_get_details": {"rate": self.deliver_get_rate},
            "ack": self.ack,
            "ack_details": {"rate": self.ack_rate},
        })
    }
}

/// This node's figures as last sampled.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeFigures {
    pub total: Figures,
    /// By queue id.
    pub queues: HashMap<u64, Figures>,
}

#[derive(Default)]
pub struct Rates {
    last: Mutex<NodeFigures>,
}

impl Rates {
    pub fn snapshot(&self) -> NodeFigures {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn sample(&self, node: &Node, metrics: &Metrics, secs: f64) {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let total = last.total.next(
            (
                get(&metrics.published),
                get(&metrics.delivered),
                get(&metrics.acked),
            ),
            secs,
        );
        let queues = node
            .queue_handles()
            .iter()
            .map(|h| {
                let before = last.queues.get(&h.id()).copied().unwrap_or_default();
                (h.id(), before.next(h.traffic.read(), secs))
            })
            .collect();
        *last = NodeFigures { total, queues };
    }
}

/// Samples every `SAMPLE_EVERY` until the broker goes.
pub async fn run(rates: Weak<Rates>, node: Weak<Node>, metrics: Weak<Metrics>) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous = Instant::now();
    loop {
        ticker.tick().await;
        let (Some(rates), Some(node), Some(metrics)) =
            (rates.upgrade(), node.upgrade(), metrics.upgrade())
        else {
            return;
        };
        let now = Instant::now();
        rates.sample(&node, &metrics, (now - previous).as_secs_f64());
        previous = now;
    }
}

/// Starts sampling for a broker's node and metrics.
pub fn start(rates: &Arc<Rates>, node: &Arc<Node>, metrics: &Arc<Metrics>) {
    tokio::spawn(run(
        Arc::downgrade(rates),
        Arc::downgrade(node),
        Arc::downgrade(metrics),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_is_the_growth_over_the_interval() {
        let before = Figures {
            publish: 100,
            deliver_get: 50,
            ack: 40,
            ..Default::default()
        };
        let after = before.next((600, 150, 40), 5.0);
        assert_eq!(
            (after.publish, after.deliver_get, after.ack),
            (600, 150, 40)
        );
        assert_eq!(
            (after.publish_rate, after.deliver_get_rate, after.ack_rate),
            (100.0, 20.0, 0.0)
        );
    }

    #[test]
    fn counters_that_went_back_or_no_time_give_no_rate() {
        let before = Figures {
            publish: 100,
            ..Default::default()
        };
        assert_eq!(before.next((10, 0, 0), 5.0).publish_rate, 0.0);
        assert_eq!(before.next((200, 0, 0), 0.0).publish_rate, 0.0);
    }

    #[test]
    fn nodes_add_up() {
        let mut sum = Figures::default();
        let one = Figures {
            publish: 3,
            publish_rate: 1.5,
            ..Default::default()
        };
        sum.add(&one);
        sum.add(&one);
        assert_eq!((sum.publish, sum.publish_rate), (6, 3.0));
        assert_eq!(sum.to_json()["publish_details"]["rate"], 3.0);
    }
}
