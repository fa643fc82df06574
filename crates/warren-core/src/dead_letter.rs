//! What a message looks like after it is dead-lettered: the `x-death` history RabbitMQ
//! writes into its headers, the routing key it is republished with, and which target queues
//! would form a cycle.
//!
//! The queue state machine (`queue`) decides that a message dies and why; the cluster crate's
//! dead-letter service calls this to rewrite the message, routes it through the metadata
//! (`meta`) and publishes it. Pure: the caller passes the time.

use warren_codec::{BasicProperties, FieldTable, FieldValue, LongStr, ShortStr};

use crate::queue::DeadLetterReason;

/// The queue arguments that say where a queue's dead messages go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterTarget {
    pub exchange: String,
    /// `x-dead-letter-routing-key`; without it the message keeps its routing keys.
    pub routing_key: Option<String>,
}

impl DeadLetterTarget {
    /// From a queue's arguments; `None` when it has no dead-letter exchange.
    pub fn from_arguments(args: &FieldTable) -> Option<DeadLetterTarget> {
        let exchange = args.get("x-dead-letter-exchange")?.as_str()?.to_owned();
        let routing_key = args
            .get("x-dead-letter-routing-key")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        Some(DeadLetterTarget {
            exchange,
            routing_key,
        })
    }
}

/// One death of a message, as recorded in `x-death`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Death<'a> {
    pub queue: &'a str,
    pub reason: DeadLetterReason,
    /// The exchange and routing key the message was last published with.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// Seconds since the Unix epoch.
    pub time: u64,
}

fn long(s: &str) -> FieldValue {
    FieldValue::LongStr(LongStr::from(s))
}

fn key(s: &'static str) -> ShortStr {
    ShortStr::from_static(s)
}

fn entry_is(entry: &FieldValue, queue: &str, reason: &str) -> bool {
    let FieldValue::Table(t) = entry else {
        return false;
    };
    let field = |k: &str| t.get(k).and_then(|v| v.as_str());
    field("queue") == Some(queue) && field("reason") == Some(reason)
}

/// Rewrites `props` for a message that died as `death` says, as RabbitMQ does: an `x-death`
/// entry per (queue, reason) with a count, most recent first; `x-first-death-*` set once and
/// `x-last-death-*` every time; a per-message `expiration` moved to `original-expiration` so
/// the message does not expire again in the dead-letter queue.
pub fn annotate(props: &mut BasicProperties, death: &Death<'_>) {
    let reason = death.reason.as_str();
    let mut headers = props.headers.take().unwrap_or_default();
    let mut history = match headers.remove("x-death") {
        Some(FieldValue::Array(entries)) => entries,
        _ => Vec::new(),
    };
    let previous = history
        .iter()
        .position(|e| entry_is(e, death.queue, reason));
    let mut entry = match previous {
        Some(i) => match history.remove(i) {
            FieldValue::Table(t) => t,
            _ => FieldTable::new(),
        },
        None => {
            let mut t = FieldTable::new();
            t.insert(key("count"), FieldValue::I64(0));
            t.insert(key("reason"), long(reason));
            t.insert(key("queue"), long(death.queue));
            t
        }
    };
    let count = entry.get("count").and_then(|v| v.as_i64()).unwrap_or(0);
    entry.insert(key("count"), FieldValue::I64(count + 1));
    entry.insert(key("time"), FieldValue::Timestamp(death.time));
    entry.insert(key("exchange"), long(death.exchange));
    entry.insert(
        key("routing-keys"),
        FieldValue::Array(vec![long(death.routing_key)]),
    );
    if let Some(expiration) = props.expiration.take() {
        entry.insert(key("original-expiration"), long(expiration.as_str()));
    }
    history.insert(0, FieldValue::Table(entry));
    headers.insert(key("x-death"), FieldValue::Array(history));
    for (name, value) in [
        ("reason", reason),
        ("queue", death.queue),
        ("exchange", death.exchange),
    ] {
        let first = format!("x-first-death-{name}");
        if headers.get(&first).is_none()
            && let Ok(k) = ShortStr::try_from(first)
        {
            headers.insert(k, long(value));
        }
        if let Ok(k) = ShortStr::try_from(format!("x-last-death-{name}")) {
            headers.insert(k, long(value));
        }
    }
    props.headers = Some(headers);
}

/// Whether republishing a message with these headers to `queue` would close a dead-letter
/// cycle that no client broke: the message already died in `queue` and was never rejected on
/// the way. RabbitMQ drops the message for such a target.
pub fn is_cycle(headers: Option<&FieldTable>, queue: &str) -> bool {
    let Some(FieldValue::Array(history)) = headers.and_then(|h| h.get("x-death")) else {
        return false;
    };
    let field = |e: &FieldValue, k: &str| match e {
        FieldValue::Table(t) => t.get(k).and_then(|v| v.as_str()).map(str::to_owned),
        _ => None,
    };
    let died_there = history
        .iter()
        .any(|e| field(e, "queue").as_deref() == Some(queue));
    let rejected = history
        .iter()
        .any(|e| field(e, "reason").as_deref() == Some("rejected"));
    died_there && !rejected
}

#[cfg(test)]
mod tests {
    use super::*;

    fn death(queue: &str, reason: DeadLetterReason) -> Death<'_> {
        Death {
            queue,
            reason,
            exchange: "orders",
            routing_key: "new",
            time: 1_700_000_000,
        }
    }

    fn entries(props: &BasicProperties) -> Vec<FieldTable> {
        match props.headers.as_ref().and_then(|h| h.get("x-death")) {
            Some(FieldValue::Array(a)) => a
                .iter()
                .map(|e| match e {
                    FieldValue::Table(t) => t.clone(),
                    other => panic!("x-death entry is not a table: {other:?}"),
                })
                .collect(),
            other => panic!("no x-death array: {other:?}"),
        }
    }

    fn text(t: &FieldTable, k: &str) -> String {
        t.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    }

    #[test]
    fn first_death_writes_one_entry_and_the_first_and_last_headers() {
        let mut props = BasicProperties {
            expiration: Some(ShortStr::try_from("5000").unwrap()),
            ..Default::default()
        };
        annotate(&mut props, &death("work", DeadLetterReason::Expired));
        let e = entries(&props);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].get("count"), Some(&FieldValue::I64(1)));
        assert_eq!(text(&e[0], "reason"), "expired");
        assert_eq!(text(&e[0], "queue"), "work");
        assert_eq!(text(&e[0], "exchange"), "orders");
        assert_eq!(text(&e[0], "original-expiration"), "5000");
        assert_eq!(
            e[0].get("routing-keys"),
            Some(&FieldValue::Array(vec![long("new")]))
        );
        assert_eq!(
            e[0].get("time"),
            Some(&FieldValue::Timestamp(1_700_000_000))
        );
        assert_eq!(props.expiration, None, "the message must not expire again");
        let h = props.headers.as_ref().unwrap();
        assert_eq!(text(h, "x-first-death-reason"), "expired");
        assert_eq!(text(h, "x-first-death-queue"), "work");
        assert_eq!(text(h, "x-last-death-queue"), "work");
    }

    #[test]
    fn the_same_queue_and_reason_counts_up_and_moves_to_the_front() {
        let mut props = BasicProperties::default();
        annotate(&mut props, &death("a", DeadLetterReason::Rejected));
        annotate(&mut props, &death("b", DeadLetterReason::Expired));
        annotate(&mut props, &death("a", DeadLetterReason::Rejected));
        let e = entries(&props);
        assert_eq!(e.len(), 2);
        assert_eq!(text(&e[0], "queue"), "a");
        assert_eq!(e[0].get("count"), Some(&FieldValue::I64(2)));
        assert_eq!(text(&e[1], "queue"), "b");
        let h = props.headers.as_ref().unwrap();
        assert_eq!(text(h, "x-first-death-queue"), "a");
        assert_eq!(text(h, "x-first-death-reason"), "rejected");
        assert_eq!(text(h, "x-last-death-queue"), "a");
    }

    #[test]
    fn other_headers_are_kept() {
        let mut headers = FieldTable::new();
        headers.insert(key("tenant"), long("acme"));
        let mut props = BasicProperties {
            headers: Some(headers),
            ..Default::default()
        };
        annotate(&mut props, &death("a", DeadLetterReason::MaxLen));
        assert_eq!(text(props.headers.as_ref().unwrap(), "tenant"), "acme");
    }

    #[test]
    fn cycles_without_a_rejection_are_detected() {
        let mut props = BasicProperties::default();
        annotate(&mut props, &death("a", DeadLetterReason::Expired));
        assert!(is_cycle(props.headers.as_ref(), "a"));
        assert!(!is_cycle(props.headers.as_ref(), "b"));
        annotate(&mut props, &death("b", DeadLetterReason::Rejected));
        assert!(
            !is_cycle(props.headers.as_ref(), "a"),
            "a rejection breaks it"
        );
        assert!(!is_cycle(None, "a"));
    }

    #[test]
    fn target_comes_from_the_arguments() {
        let mut args = FieldTable::new();
        assert_eq!(DeadLetterTarget::from_arguments(&args), None);
        args.insert(key("x-dead-letter-exchange"), long(""));
        assert_eq!(
            DeadLetterTarget::from_arguments(&args),
            Some(DeadLetterTarget {
                exchange: String::new(),
                routing_key: None
            })
        );
        args.insert(key("x-dead-letter-routing-key"), long("dead"));
        assert_eq!(
            DeadLetterTarget::from_arguments(&args).unwrap().routing_key,
            Some("dead".to_owned())
        );
    }
}
