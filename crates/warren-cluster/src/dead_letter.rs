//! The dead-letter service: publishes the messages a queue's leader dead-letters to the
//! queue's dead-letter exchange, and lets the source queue drop each one only once every
//! target queue has committed it (at-least-once, for every queue kind).
//!
//! Queue handles (`queue`) hand it `DeadLetter`s from inside state-machine apply; it runs as
//! one task of the node (`node`), so it can route through the metadata and submit to target
//! queues like a publishing connection does. The message rewrite (`x-death`) and the cycle
//! rule are pure and live in `warren_core::dead_letter`.
//!
//! Each source numbers its dead-letters; a target takes each number once and only in rising
//! order. The service submits in the order the effects arrived, which is that order (a new
//! leader resends what was in flight first, sorted), and a target's submissions keep their
//! order, so no dead-letter is mistaken for a resend.

use std::sync::Weak;

use tokio::sync::mpsc;
use tracing::{debug, warn};
use warren_codec::{BasicProperties, ShortStr};
use warren_core::MessageContent;
use warren_core::dead_letter::{DeadLetterTarget, Death, annotate, is_cycle};
use warren_core::queue::{MessageMeta, Publisher, PublisherId, QueueCmd};

use crate::node::Node;
use crate::queue::{DeadLetter, ReplyTo};
use crate::types::QueueRequest;

pub(crate) async fn run(node: Weak<Node>, mut rx: mpsc::UnboundedReceiver<DeadLetter>) {
    while let Some(dl) = rx.recv().await {
        let Some(node) = node.upgrade() else { return };
        publish(&node, dl);
    }
}

/// Submits one dead-letter to its targets now (keeping the order) and settles the source
/// from a task once they all answered.
fn publish(node: &Node, dl: DeadLetter) {
    let source = dl.source.clone();
    let def = source.def();
    let vhost = source.vhost().to_owned();
    let Some(target) = DeadLetterTarget::from_arguments(&source.arguments()) else {
        settle(dl);
        return;
    };
    let content = rewrite(&dl, &def.name, &target);
    let headers = content
        .decode_properties()
        .ok()
        .and_then(|p| p.headers.clone());
    let routed = node.meta().route(
        &vhost,
        &target.exchange,
        content.routing_key.as_str(),
        headers.as_ref(),
    );
    let queues = match routed {
        Ok(r) => r.queues,
        Err(e) => {
            // RabbitMQ drops a dead-letter whose exchange is missing; so does Warren.
            debug!(queue = %def.name, error = %e.text, "dead-letter exchange cannot route");
            settle(dl);
            return;
        }
    };
    let meta = MessageMeta {
        size: content.body.len() as u64,
        priority: content
            .decode_properties()
            .ok()
            .and_then(|p| p.priority)
            .unwrap_or(0),
        ttl: None,
    };
    let mut answers = Vec::new();
    for name in queues {
        if is_cycle(headers.as_ref(), &name) {
            debug!(queue = %def.name, target = %name, "dead-letter cycle dropped");
            continue;
        }
        let Some(handle) = node.queue(&vhost, &name) else {
            continue;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        handle.submit(
            QueueRequest::with_content(
                QueueCmd::Enqueue {
                    meta,
                    publisher: Some(Publisher {
                        id: PublisherId::Queue(source.id()),
                        seq: dl.seq,
                    }),
                },
                content.clone(),
            ),
            ReplyTo::Oneshot(tx),
        );
        answers.push((name, rx));
    }
    tokio::spawn(async move {
        for (name, rx) in answers {
            match rx.await {
                Ok(Ok(_)) => {}
                // The target went away (deleted, or its only node is down): like an
                // unroutable dead-letter, it is dropped rather than held forever.
                Ok(Err(e)) => warn!(target = %name, error = %e, "dead-letter not taken"),
                Err(_) => warn!(target = %name, "dead-letter not answered"),
            }
        }
        settle(dl);
    });
}

fn settle(dl: DeadLetter) {
    dl.source.submit(
        QueueRequest::new(QueueCmd::DeadLettered { msgs: vec![dl.msg] }),
        ReplyTo::None,
    );
}

/// The message as it goes to the dead-letter exchange.
fn rewrite(dl: &DeadLetter, queue: &str, target: &DeadLetterTarget) -> MessageContent {
    let original = &dl.content;
    let mut props = original.decode_properties().unwrap_or_else(|e| {
        warn!(queue, error = %e, "dead-lettering a message with unreadable properties");
        BasicProperties::default()
    });
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    annotate(
        &mut props,
        &Death {
            queue,
            reason: dl.reason,
            exchange: original.exchange.as_str(),
            routing_key: original.routing_key.as_str(),
            time,
        },
    );
    let routing_key = match &target.routing_key {
        Some(k) => ShortStr::try_from(k.as_str()).unwrap_or_default(),
        None => original.routing_key.clone(),
    };
    MessageContent {
        exchange: ShortStr::try_from(target.exchange.as_str()).unwrap_or_default(),
        routing_key,
        properties: props.encoded(),
        body: original.body.clone(),
    }
}
