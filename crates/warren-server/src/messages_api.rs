//! Publishing and fetching messages through the management API, as RabbitMQ's
//! `POST /api/exchanges/{vhost}/{name}/publish` and `POST /api/queues/{vhost}/{name}/get` do:
//! for operators looking into a queue or injecting a test message, not for applications
//! (AMQP moves messages; this goes through the same queues, one request at a time).
//!
//! Served by `management`. Each request acts as a short-lived channel of its own (a fresh
//! `ChannelRef` of this node's run): a replicated queue numbers the publish under it, so a
//! resend after a leader change is taken once, and holds fetched messages unacknowledged for
//! it until the request settles them. The request ends with that channel's `ChannelDown`,
//! which returns whatever was not settled. The work runs on a task of its own, so a client
//! that hangs up midway cannot leave messages held.

use std::sync::Arc;

use axum::extract::{Path, State};
use base64::Engine;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use std::sync::atomic::Ordering;

use warren_cluster::{QueueHandle, QueueOutcome, Traffic};
use warren_codec::{BasicProperties, ShortStr};
use warren_core::json::{table_from_json, table_to_json};
use warren_core::queue::{MessageMeta, Publisher, PublisherId, QueueCmd, QueueReply};
use warren_core::{ChannelRef, ConnectionRef, MessageContent, MsgId};

use crate::broker::Broker;
use crate::management::{ApiError, Auth, QUEUE_ANSWER, Reply, bad, json_body, ok, queue_failure};

/// A channel of this node's run that no client holds: the request's own.
fn request_channel(broker: &Broker) -> ChannelRef {
    ChannelRef {
        conn: ConnectionRef {
            run: broker.node.run(),
            conn: broker.next_connection_id(),
        },
        channel: 1,
        opened: 1,
    }
}

fn short_field(props: &Map<String, Value>, key: &str) -> Result<Option<ShortStr>, ApiError> {
    match props.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => ShortStr::try_from(s.as_str()).map(Some).map_err(|_| {
            bad(format!(
                "property '{key}' must be a string of at most 255 bytes"
            ))
        }),
        Some(other) => Err(bad(format!(
            "property '{key}' must be a string, not {other}"
        ))),
    }
}

fn small_number(props: &Map<String, Value>, key: &str, max: u64) -> Result<Option<u64>, ApiError> {
    match props.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(bad(format!(
                "property '{key}' must be an integer from 0 to {max}, not {v}"
            ))),
        },
    }
}

/// Message properties from the JSON object RabbitMQ's API takes (`type` is the spec's type).
pub(crate) fn properties_from_json(v: Option<&Value>) -> Result<BasicProperties, ApiError> {
    let empty = Map::new();
    let props = match v {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(o)) => o,
        Some(other) => return Err(bad(format!("'properties' must be an object, not {other}"))),
    };
    let headers = match props.get("headers") {
        None | Some(Value::Null) => None,
        Some(h) => Some(table_from_json(h).map_err(|e| bad(format!("headers: {e}")))?),
    };
    let expiration = match props.get("expiration") {
        Some(Value::Number(n)) => ShortStr::try_from(n.to_string().as_str()).ok(),
        _ => short_field(props, "expiration")?,
    };
    if let Some(e) = &expiration
        && crate::connection::parse_expiration(e.as_str()).is_none()
    {
        return Err(bad(format!("invalid expiration '{e}'")));
    }
    Ok(BasicProperties {
        content_type: short_field(props, "content_type")?,
        content_encoding: short_field(props, "content_encoding")?,
        headers,
        delivery_mode: small_number(props, "delivery_mode", 2)?.map(|n| n as u8),
        priority: small_number(props, "priority", 255)?.map(|n| n as u8),
        correlation_id: short_field(props, "correlation_id")?,
        reply_to: short_field(props, "reply_to")?,
        expiration,
        message_id: short_field(props, "message_id")?,
        timestamp: small_number(props, "timestamp", u64::MAX)?,
        kind: short_field(props, "type")?,
        user_id: short_field(props, "user_id")?,
        app_id: short_field(props, "app_id")?,
        cluster_id: short_field(props, "cluster_id")?,
    })
}

/// Message properties as RabbitMQ's API shows them: only those set.
pub(crate) fn properties_to_json(p: &BasicProperties) -> Value {
    let mut out = Map::new();
    let mut text = |key: &str, v: &Option<ShortStr>| {
        if let Some(v) = v {
            out.insert(key.to_owned(), Value::from(v.as_str()));
        }
    };
    text("content_type", &p.content_type);
    text("content_encoding", &p.content_encoding);
    text("correlation_id", &p.correlation_id);
    text("reply_to", &p.reply_to);
    text("expiration", &p.expiration);
    text("message_id", &p.message_id);
    text("type", &p.kind);
    text("user_id", &p.user_id);
    text("app_id", &p.app_id);
    text("cluster_id", &p.cluster_id);
    if let Some(h) = &p.headers {
        out.insert("headers".into(), table_to_json(h));
    }
    if let Some(d) = p.delivery_mode {
        out.insert("delivery_mode".into(), Value::from(d));
    }
    if let Some(d) = p.priority {
        out.insert("priority".into(), Value::from(d));
    }
    if let Some(t) = p.timestamp {
        out.insert("timestamp".into(), Value::from(t));
    }
    Value::Object(out)
}

/// Publishes one message (`POST /api/exchanges/{vhost}/{name}/publish`) and answers
/// `{"routed": bool}` once every queue it was routed to has taken it.
pub(crate) async fn publish(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, exchange)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Reply {
    let body = json_body(&body)?;
    // The API's paths name the default exchange `amq.default`.
    let exchange = if exchange == "amq.default" {
        String::new()
    } else {
        exchange
    };
    let routing_key = body
        .get("routing_key")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("'routing_key' is required"))?
        .to_owned();
    let payload = body
        .get("payload")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("'payload' is required"))?;
    let payload = match body.get("payload_encoding").and_then(Value::as_str) {
        None | Some("string") => Bytes::from(payload.as_bytes().to_vec()),
        Some("base64") => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(payload)
                .map_err(|e| bad(format!("payload is not base64: {e}")))?,
        ),
        Some(other) => {
            return Err(bad(format!(
                "payload_encoding '{other}': expected 'string' or 'base64'"
            )));
        }
    };
    let properties = properties_from_json(body.get("properties"))?;
    let (Ok(exchange_name), Ok(key)) = (
        ShortStr::try_from(exchange.as_str()),
        ShortStr::try_from(routing_key.as_str()),
    ) else {
        return Err(bad("exchange and routing key are at most 255 bytes"));
    };
    let routed = broker
        .node
        .meta()
        .route(&vhost, &exchange, &routing_key, properties.headers.as_ref())
        .map_err(|e| match e.code {
            404 => ApiError::not_found(e.text),
            _ => bad(e.text),
        })?;
    let handles: Vec<Arc<QueueHandle>> = routed
        .queues
        .iter()
        .filter_map(|q| broker.node.queue(&vhost, q))
        .collect();
    if handles.is_empty() {
        return ok(json!({"routed": false}));
    }
    let meta = MessageMeta {
        size: payload.len() as u64,
        priority: properties.priority.unwrap_or(0),
        ttl: properties
            .expiration
            .as_ref()
            .and_then(|e| crate::connection::parse_expiration(e.as_str())),
    };
    let content = MessageContent {
        exchange: exchange_name,
        routing_key: key,
        properties: properties.encoded(),
        body: payload,
    };
    let channel = request_channel(&broker);
    broker.metrics.published.fetch_add(1, Ordering::Relaxed);
    let task = tokio::spawn(async move {
        let calls = handles.iter().map(|h| {
            Traffic::add(&h.traffic.published, 1);
            let publisher = h.is_replicated().then_some(Publisher {
                id: PublisherId::Channel(channel),
                seq: 1,
            });
            h.call(QueueCmd::Enqueue { meta, publisher }, Some(content.clone()))
        });
        let outcomes = futures::future::join_all(calls).await;
        for h in handles.iter().filter(|h| h.is_replicated()) {
            // The queue may forget this publisher's numbering now.
            drop(h.call(QueueCmd::ChannelDown { channel }, None));
        }
        outcomes
    });
    // On a timeout the task goes on (the publish may still be taken); the client is told
    // the outcome is unknown, as a publisher without a confirm would be.
    let outcomes = match tokio::time::timeout(QUEUE_ANSWER, task).await {
        Ok(joined) => joined.map_err(|e| ApiError::unavailable(e.to_string()))?,
        Err(_) => {
            return Err(ApiError::unavailable(format!(
                "no answer from the queues within {QUEUE_ANSWER:?}: the message may or may \
                 not have been taken"
            )));
        }
    };
    let mut taken = false;
    for outcome in outcomes {
        match outcome.map_err(queue_failure)?.reply {
            QueueReply::Enqueued { .. } | QueueReply::Duplicate => taken = true,
            QueueReply::Rejected { .. } => {}
            QueueReply::Error(e) => return Err(bad(e.text)),
            other => {
                return Err(ApiError::unavailable(format!("unexpected reply {other:?}")));
            }
        }
    }
    ok(json!({"routed": taken}))
}

/// What happens to fetched messages, RabbitMQ's `ackmode`.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AckMode {
    AckRequeue,
    Ack,
    RejectRequeue,
    Reject,
}

impl AckMode {
    fn parse(text: &str) -> Result<Self, ApiError> {
        Ok(match text {
            "ack_requeue_true" => AckMode::AckRequeue,
            "ack_requeue_false" => AckMode::Ack,
            "reject_requeue_true" => AckMode::RejectRequeue,
            "reject_requeue_false" => AckMode::Reject,
            other => {
                return Err(bad(format!(
                    "ackmode '{other}': expected ack_requeue_true, ack_requeue_false, \
                     reject_requeue_true or reject_requeue_false"
                )));
            }
        })
    }

    fn settle(self, channel: ChannelRef, msgs: Vec<MsgId>) -> QueueCmd {
        match self {
            AckMode::AckRequeue | AckMode::RejectRequeue => QueueCmd::Requeue { channel, msgs },
            AckMode::Ack => QueueCmd::Settle { channel, msgs },
            AckMode::Reject => QueueCmd::Discard { channel, msgs },
        }
    }
}

/// A fetched message as RabbitMQ's API shows it.
fn message_json(
    outcome: &QueueOutcome,
    delivery_count: u32,
    remaining: u64,
    encoding: &str,
    truncate: Option<usize>,
) -> Value {
    let Some(content) = &outcome.content else {
        return json!({});
    };
    let body = &content.body;
    let shown = &body[..truncate.map_or(body.len(), |t| t.min(body.len()))];
    let (payload, payload_encoding) = match std::str::from_utf8(shown) {
        Ok(text) if encoding == "auto" => (text.to_owned(), "string"),
        _ => (
            base64::engine::general_purpose::STANDARD.encode(shown),
            "base64",
        ),
    };
    let properties = content
        .decode_properties()
        .map(|p| properties_to_json(&p))
        .unwrap_or_else(|_| json!({}));
    json!({
        "payload_bytes": body.len(),
        "redelivered": delivery_count > 0,
        "exchange": content.exchange.as_str(),
        "routing_key": content.routing_key.as_str(),
        "message_count": remaining,
        "properties": properties,
        "payload": payload,
        "payload_encoding": payload_encoding,
    })
}

/// Fetches up to `count` messages (`POST /api/queues/{vhost}/{name}/get`), then acks,
/// rejects or requeues them as `ackmode` says.
pub(crate) async fn get(
    State(broker): State<Arc<Broker>>,
    _auth: Auth,
    Path((vhost, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Reply {
    let body = json_body(&body)?;
    let count = body
        .get("count")
        .and_then(Value::as_u64)
        .filter(|c| (1..=10_000).contains(c))
        .ok_or_else(|| bad("'count' (1 to 10000) is required"))?;
    let mode = AckMode::parse(
        body.get("ackmode")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("'ackmode' is required"))?,
    )?;
    let encoding = match body.get("encoding").and_then(Value::as_str) {
        None | Some("auto") => "auto",
        Some("base64") => "base64",
        Some(other) => {
            return Err(bad(format!(
                "encoding '{other}': expected 'auto' or 'base64'"
            )));
        }
    };
    let truncate = body
        .get("truncate")
        .and_then(Value::as_u64)
        .map(|t| t as usize);
    let exclusive = broker
        .node
        .meta()
        .queue(&vhost, &name)
        .map(|q| q.exclusive_owner.is_some());
    match exclusive {
        None => {
            return Err(ApiError::not_found(format!(
                "no queue '{name}' in vhost '{vhost}'"
            )));
        }
        Some(true) => {
            return Err(bad(format!(
                "RESOURCE_LOCKED - queue '{name}' in vhost '{vhost}' is exclusive to a connection"
            )));
        }
        Some(false) => {}
    }
    let handle = broker
        .node
        .queue(&vhost, &name)
        .ok_or_else(|| ApiError::not_found(format!("no queue '{name}' in vhost '{vhost}'")))?;
    let channel = request_channel(&broker);
    let metrics = broker.metrics.clone();
    // Gets stop at the deadline; what was fetched is then neither acked nor rejected but
    // returned by the ChannelDown, so a client told "timed out" has taken nothing.
    let deadline = tokio::time::Instant::now() + QUEUE_ANSWER;
    let task = tokio::spawn(async move {
        let mut fetched = Vec::new();
        let mut failure = None;
        for _ in 0..count {
            let got = handle.call(
                QueueCmd::Get {
                    channel,
                    no_ack: false,
                },
                None,
            );
            let Ok(got) = tokio::time::timeout_at(deadline, got).await else {
                failure = Some(ApiError::unavailable(format!(
                    "queue '{}' did not answer within {QUEUE_ANSWER:?} (no leader?)",
                    handle.name()
                )));
                break;
            };
            match got {
                Ok(outcome) => match outcome.reply {
                    QueueReply::GetOk {
                        msg,
                        delivery_count,
                        remaining,
                    } => {
                        Traffic::add(&handle.traffic.delivered, 1);
                        metrics.delivered.fetch_add(1, Ordering::Relaxed);
                        let shown =
                            message_json(&outcome, delivery_count, remaining, encoding, truncate);
                        fetched.push((msg, shown));
                    }
                    QueueReply::Error(e) => {
                        failure = Some(bad(e.text));
                        break;
                    }
                    _ => break,
                },
                Err(e) => {
                    failure = Some(queue_failure(e));
                    break;
                }
            }
        }
        let msgs: Vec<MsgId> = fetched.iter().map(|(m, _)| *m).collect();
        let fetched_count = msgs.len() as u64;
        if failure.is_none() && !msgs.is_empty() {
            // Once submitted the settlement goes ahead whatever comes, so the answer waits
            // for it: the client must learn what became of what it was shown.
            match handle.call(mode.settle(channel, msgs), None).await {
                Ok(_) if mode == AckMode::Ack => {
                    Traffic::add(&handle.traffic.acked, fetched_count);
                    metrics.acked.fetch_add(fetched_count, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => failure = Some(queue_failure(e)),
            }
        }
        // Whatever was fetched and not settled above comes back to the queue.
        let _ = handle.call(QueueCmd::ChannelDown { channel }, None).await;
        match failure {
            Some(e) => Err(e),
            None => Ok(fetched.into_iter().map(|(_, shown)| shown).collect()),
        }
    });
    let shown: Vec<Value> = match tokio::time::timeout(2 * QUEUE_ANSWER, task).await {
        Ok(joined) => joined.map_err(|e| ApiError::unavailable(e.to_string()))??,
        Err(_) => {
            return Err(ApiError::unavailable(format!(
                "queue '{name}' did not confirm the {} of the fetched messages in time: it \
                 will happen when the queue has a leader again",
                match mode {
                    AckMode::Ack => "ack",
                    AckMode::Reject => "reject",
                    AckMode::AckRequeue | AckMode::RejectRequeue => "requeue",
                }
            )));
        }
    };
    ok(Value::Array(shown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_go_through_json_and_back() {
        let given = json!({
            "content_type": "text/plain",
            "delivery_mode": 2,
            "priority": 5,
            "expiration": "60000",
            "headers": {"tenant": "acme", "attempt": 3},
            "type": "order.created",
            "timestamp": 1_700_000_000u64,
        });
        let props = properties_from_json(Some(&given)).expect("valid properties");
        assert_eq!(
            props.kind.as_ref().map(|k| k.as_str()),
            Some("order.created")
        );
        assert_eq!(properties_to_json(&props), given);
        let decoded = BasicProperties::decode(&props.encoded()).expect("encodes");
        assert_eq!(decoded, props);
    }

    #[test]
    fn bad_properties_are_refused_with_the_field_named() {
        for (given, named) in [
            (json!({"delivery_mode": 3}), "delivery_mode"),
            (json!({"expiration": "-5"}), "expiration"),
            (json!({"content_type": 7}), "content_type"),
            (json!({"headers": [1]}), "headers"),
        ] {
            let Err(ApiError(_, text)) = properties_from_json(Some(&given)) else {
                panic!("{given} accepted");
            };
            assert!(text.contains(named), "{text}");
        }
        assert!(properties_from_json(Some(&json!("x"))).is_err());
    }

    #[test]
    fn ack_modes_settle_as_rabbitmq_names_them() {
        let ch = ChannelRef {
            conn: ConnectionRef {
                run: warren_core::NodeRun {
                    node: 1,
                    incarnation: 1,
                },
                conn: 9,
            },
            channel: 1,
            opened: 1,
        };
        let mode = |m| AckMode::parse(m).expect("known").settle(ch, vec![]);
        assert!(matches!(mode("ack_requeue_true"), QueueCmd::Requeue { .. }));
        assert!(matches!(
            mode("reject_requeue_true"),
            QueueCmd::Requeue { .. }
        ));
        assert!(matches!(mode("ack_requeue_false"), QueueCmd::Settle { .. }));
        assert!(matches!(
            mode("reject_requeue_false"),
            QueueCmd::Discard { .. }
        ));
        assert!(AckMode::parse("ack").is_err());
    }
}
