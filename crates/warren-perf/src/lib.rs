//! A load generator for any AMQP 0-9-1 broker, in the spirit of RabbitMQ's PerfTest: producers
//! publish (persistent, with a window of outstanding publisher confirms), consumers take with
//! manual acks (optionally several per ack), and every message carries its producer, sequence
//! number and send time. The report gives publish, confirm and consume rates, confirm and
//! end-to-end latency percentiles, and checks that every confirmed message was consumed
//! (lost) and how many came twice. It also measures its own CPU time per message, to show it
//! is not what limits the figures.
//!
//! `main.rs` is the command line; the server's integration tests call [`run`] against a real
//! broker. Every loop is bounded in count and in time.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Serialize;
use tokio::sync::Mutex;

#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "warren-perf",
    version,
    about = "AMQP 0-9-1 load generator and checker"
)]
pub struct Options {
    /// Broker the producers use; several, comma-separated, are used in turn (producer i
    /// connects to the i-th, wrapping around). The first one declares the queues.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,
    /// Broker(s) the consumers use, as for --uri (default: --uri).
    #[arg(long)]
    pub consumer_uri: Option<String>,
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Messages each producer publishes.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Upper bound on the whole run, seconds (publishing stops; the drain gets as long).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Body size in bytes (at least the 20-byte stamp).
    #[arg(long, default_value_t = 1000)]
    pub size: usize,
    /// Messages per second per producer; 0 = as fast as confirms allow.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Outstanding publisher confirms per producer; 0 = no confirms.
    #[arg(long, default_value_t = 64)]
    pub confirm: usize,
    #[arg(long, default_value_t = 100)]
    pub prefetch: u16,
    /// Ack every N deliveries with multiple=true (1 = each one).
    #[arg(long, default_value_t = 1)]
    pub multi_ack: u64,
    /// Queue name (producers use the default exchange unless --exchange is given).
    #[arg(long, default_value = "warren-perf")]
    pub queue: String,
    /// Number of queues: with more than one they are named QUEUE-0, QUEUE-1, ...; producer i
    /// publishes to queue i mod N and consumer i consumes from queue i mod N.
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Publish to this exchange (declared durable, every queue bound to it with its own name
    /// as the binding key) instead of the default exchange.
    #[arg(long)]
    pub exchange: Option<String>,
    /// Type of --exchange: fanout (every message reaches every queue), direct or topic.
    #[arg(long, default_value = "fanout")]
    pub exchange_type: String,
    /// With --producers 0: consume until this many messages came (draining a backlog).
    #[arg(long, default_value_t = 0)]
    pub expect: u64,
    /// Queue arguments as key=value (integers become numbers), e.g. x-queue-type=quorum.
    #[arg(long = "queue-arg")]
    pub queue_args: Vec<String>,
    /// Persistent messages (delivery mode 2).
    #[arg(long, default_value_t = true)]
    pub persistent: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(mut samples: Vec<u64>) -> Percentiles {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: *samples.last().unwrap_or(&0),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub published: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub consumed: u64,
    pub publish_rate: f64,
    pub consume_rate: f64,
    pub confirm_latency_us: Percentiles,
    pub end_to_end_latency_us: Percentiles,
    /// Confirmed messages never consumed (0 in a run without consumers; in a run without
    /// producers, how many of `--expect` did not come).
    pub lost: u64,
    /// Deliveries of a message already consumed.
    pub duplicates: u64,
    /// This process's CPU time per consumed message, microseconds.
    pub cpu_us_per_message: f64,
    pub seconds: f64,
}

impl Report {
    pub fn text(&self) -> String {
        format!(
            "published {} confirmed {} nacked {} consumed {} in {:.2} s\n\
             rates: publish {:.0}/s consume {:.0}/s\n\
             confirm latency us: p50 {} p95 {} p99 {} max {}\n\
             end-to-end latency us: p50 {} p95 {} p99 {} max {}\n\
             lost {} duplicates {}\n\
             own CPU per message: {:.1} us",
            self.published,
            self.confirmed,
            self.nacked,
            self.consumed,
            self.seconds,
            self.publish_rate,
            self.consume_rate,
            self.confirm_latency_us.p50,
            self.confirm_latency_us.p95,
            self.confirm_latency_us.p99,
            self.confirm_latency_us.max,
            self.end_to_end_latency_us.p50,
            self.end_to_end_latency_us.p95,
            self.end_to_end_latency_us.p99,
            self.end_to_end_latency_us.max,
            self.lost,
            self.duplicates,
            self.cpu_us_per_message,
        )
    }
}

/// The stamp at the start of every body: producer, sequence number, send time.
const STAMP: usize = 20;

pub fn encode_body(producer: u32, seq: u64, sent_ns: u64, size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size.max(STAMP));
    body.extend_from_slice(&producer.to_be_bytes());
    body.extend_from_slice(&seq.to_be_bytes());
    body.extend_from_slice(&sent_ns.to_be_bytes());
    body.resize(size.max(STAMP), b'.');
    body
}

pub fn decode_body(body: &[u8]) -> Option<(u32, u64, u64)> {
    let producer = u32::from_be_bytes(body.get(0..4)?.try_into().ok()?);
    let seq = u64::from_be_bytes(body.get(4..12)?.try_into().ok()?);
    let sent = u64::from_be_bytes(body.get(12..20)?.try_into().ok()?);
    Some((producer, seq, sent))
}

/// The queues of a run, in order.
pub fn queue_names(opts: &Options) -> Vec<String> {
    if opts.queues <= 1 {
        vec![opts.queue.clone()]
    } else {
        (0..opts.queues)
            .map(|i| format!("{}-{i}", opts.queue))
            .collect()
    }
}

/// The i-th of a comma-separated list of URIs, wrapping around.
fn nth_uri(list: &str, i: usize) -> String {
    let uris: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    uris.get(i % uris.len().max(1)).unwrap_or(&list).to_string()
}

fn queue_arguments(pairs: &[String]) -> anyhow::Result<FieldTable> {
    let mut t = FieldTable::default();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("queue argument '{pair}' is not key=value"))?;
        let value = match v.parse::<i64>() {
            Ok(n) => AMQPValue::LongLongInt(n),
            Err(_) => AMQPValue::LongString(LongString::from(v)),
        };
        t.insert(k.into(), value);
    }
    Ok(t)
}

/// CPU time (user + system) of this process so far, from /proc.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let total = ticks(11) + ticks(12);
    Duration::from_millis(total * 10)
}

/// A message as one queue delivers it: the queue's index, the producer and its sequence
/// number (a fan-out message is expected once per queue).
type Key = (u32, u32, u64);

#[derive(Default)]
struct Consumed {
    seen: HashSet<Key>,
    latencies: Vec<u64>,
    duplicates: u64,
}

pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let start = Instant::now();
    let cpu_start = cpu_time();
    let deadline = start + Duration::from_secs(opts.duration);
    let args = queue_arguments(&opts.queue_args)?;
    let queues = queue_names(opts);
    let setup_uri = nth_uri(&opts.uri, 0);
    let setup = Connection::connect(&setup_uri, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {setup_uri}"))?;
    let ch = setup.create_channel().await?;
    if let Some(exchange) = &opts.exchange {
        let kind = match opts.exchange_type.as_str() {
            "fanout" => lapin::ExchangeKind::Fanout,
            "direct" => lapin::ExchangeKind::Direct,
            "topic" => lapin::ExchangeKind::Topic,
            other => anyhow::bail!("unsupported --exchange-type {other}"),
        };
        ch.exchange_declare(
            exchange.as_str().into(),
            kind,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .context("declaring the exchange")?;
    }
    for queue in &queues {
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        )
        .await
        .with_context(|| format!("declaring queue {queue}"))?;
        if let Some(exchange) = &opts.exchange {
            ch.queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                queue.as_str().into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .with_context(|| format!("binding queue {queue}"))?;
        }
    }
    let fanout = opts.exchange.is_some() && opts.exchange_type == "fanout";

    let consumed = Arc::new(Mutex::new(Consumed::default()));
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let consumer_uri = opts
        .consumer_uri
        .clone()
        .unwrap_or_else(|| opts.uri.clone());
    let mut consumer_tasks = Vec::new();
    let stamped = opts.producers > 0;
    for c in 0..opts.consumers {
        let uri = nth_uri(&consumer_uri, c);
        let conn = Connection::connect(&uri, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to {uri}"))?;
        let ch = conn.create_channel().await?;
        ch.basic_qos(opts.prefetch, BasicQosOptions::default())
            .await?;
        let queue_index = (c % queues.len()) as u32;
        let mut stream = ch
            .basic_consume(
                queues[queue_index as usize].as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumed = consumed.clone();
        let stop = stop_consumers.clone();
        let multi = opts.multi_ack.max(1);
        consumer_tasks.push(tokio::spawn(async move {
            let mut since_ack = 0u64;
            let mut acks = futures::stream::FuturesUnordered::new();
            while !stop.load(Ordering::Acquire) {
                let next = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
                let Ok(Some(Ok(d))) = next else {
                    continue;
                };
                if let Some((producer, seq, sent)) = decode_body(&d.data) {
                    let now = start.elapsed().as_nanos() as u64;
                    let mut c = consumed.lock().await;
                    if c.seen.insert((queue_index, producer, seq)) {
                        // A backlog left by an earlier run carries another run's clock.
                        if stamped {
                            c.latencies.push(now.saturating_sub(sent) / 1000);
                        }
                    } else {
                        c.duplicates += 1;
                    }
                }
                since_ack += 1;
                if multi > 1 {
                    // A multiple ack covers every earlier tag, so these go out in order.
                    if since_ack >= multi {
                        let _ = d.ack(BasicAckOptions { multiple: true }).await;
                        since_ack = 0;
                    }
                    continue;
                }
                let acker = d.acker.clone();
                let mut ack = Box::pin(async move { acker.ack(BasicAckOptions::default()).await });
                // Waiting until lapin has written each ack would cap the consumer at one ack
                // per round trip to lapin's I/O thread (about 30,000/s here), which a fast
                // broker reaches before its own limit. The first poll hands the ack over;
                // lapin may write single acks in any order, which is harmless for them (a
                // multiple ack sent this way could arrive after a later one and name an
                // unknown tag).
                if futures::poll!(ack.as_mut()).is_pending() {
                    acks.push(ack);
                }
                while let Some(Some(_)) = acks.next().now_or_never() {}
            }
            while acks.next().await.is_some() {}
            drop(conn);
        }));
    }

    let mut producer_tasks = Vec::new();
    for p in 0..opts.producers {
        let uri = nth_uri(&opts.uri, p);
        let conn = Connection::connect(&uri, ConnectionProperties::default())
            .await
            .with_context(|| format!("connecting to {uri}"))?;
        let (exchange, routing_key) = match &opts.exchange {
            Some(e) => (e.clone(), queues[p % queues.len()].clone()),
            None => (String::new(), queues[p % queues.len()].clone()),
        };
        let ch = conn.create_channel().await?;
        if opts.confirm > 0 {
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
        }
        let opts = opts.clone();
        producer_tasks.push(tokio::spawn(async move {
            let props = if opts.persistent {
                BasicProperties::default().with_delivery_mode(2)
            } else {
                BasicProperties::default()
            };
            let mut confirmed = Vec::new();
            let mut latencies = Vec::new();
            let mut nacked = 0u64;
            let mut published = 0u64;
            let mut window = futures::stream::FuturesOrdered::new();
            let interval = (opts.rate > 0).then(|| Duration::from_secs_f64(1.0 / opts.rate as f64));
            for seq in 0..opts.count {
                if Instant::now() >= deadline {
                    break;
                }
                if let Some(i) = interval {
                    // Confirms are timed when their future is polled, so the window is polled
                    // while waiting for the next send: otherwise every confirm that arrives
                    // during the pause would be timed only when the window next fills, up to
                    // `confirm` intervals late.
                    let due = tokio::time::Instant::from_std(start + i * seq as u32);
                    loop {
                        tokio::select! {
                            biased;
                            Some((seq, latency, r)) = window.next(), if !window.is_empty() => {
                                record(seq, latency, r, &mut confirmed, &mut latencies, &mut nacked);
                            }
                            () = tokio::time::sleep_until(due) => break,
                        }
                    }
                }
                let sent = start.elapsed();
                let body = encode_body(p as u32, seq, sent.as_nanos() as u64, opts.size);
                let Ok(confirm) = ch
                    .basic_publish(
                        exchange.as_str().into(),
                        routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &body,
                        props.clone(),
                    )
                    .await
                else {
                    break;
                };
                published += 1;
                if opts.confirm > 0 {
                    // Timed inside the future: it completes when the confirm arrives.
                    window.push_back(async move {
                        let r = confirm.await;
                        (seq, start.elapsed().saturating_sub(sent), r)
                    });
                    while window.len() >= opts.confirm {
                        if let Some((seq, latency, r)) = window.next().await {
                            record(seq, latency, r, &mut confirmed, &mut latencies, &mut nacked);
                        }
                    }
                } else {
                    confirmed.push(seq);
                }
            }
            while let Some((seq, latency, r)) = window.next().await {
                record(seq, latency, r, &mut confirmed, &mut latencies, &mut nacked);
            }
            drop(conn);
            (p as u32, published, confirmed, latencies, nacked)
        }));
    }

    let mut report = Report::default();
    let mut expected = Vec::new();
    let mut confirm_latencies = Vec::new();
    for t in producer_tasks {
        let (p, published, confirmed, latencies, nacked) = t.await?;
        report.published += published;
        report.confirmed += confirmed.len() as u64;
        report.nacked += nacked;
        confirm_latencies.extend(latencies);
        let targets: Vec<u32> = if fanout {
            (0..queues.len() as u32).collect()
        } else {
            vec![p % queues.len() as u32]
        };
        for s in confirmed {
            expected.extend(targets.iter().map(|q| (*q, p, s)));
        }
    }
    let published_at = start.elapsed();

    // Drain: until every confirmed message came, or as long again as the whole run allows.
    let drain_deadline = Instant::now() + Duration::from_secs(opts.duration);
    loop {
        let done = {
            let c = consumed.lock().await;
            if opts.producers == 0 {
                c.seen.len() as u64 >= opts.expect
            } else {
                expected.iter().all(|k| c.seen.contains(k))
            }
        };
        if done || Instant::now() >= drain_deadline || opts.consumers == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let consumed_at = start.elapsed();
    stop_consumers.store(true, Ordering::Release);
    for t in consumer_tasks {
        let _ = t.await;
    }
    let c = consumed.lock().await;
    report.consumed = c.seen.len() as u64;
    report.duplicates = c.duplicates;
    // A publish-only run (filling a backlog for a later run to drain) consumes nothing: its
    // messages are not lost, they are the next run's to check.
    // A run that only consumes (draining a backlog) expects `--expect` messages.
    report.lost = if opts.consumers == 0 {
        0
    } else if opts.producers == 0 {
        opts.expect.saturating_sub(report.consumed)
    } else {
        expected.iter().filter(|k| !c.seen.contains(k)).count() as u64
    };
    report.end_to_end_latency_us = Percentiles::of(c.latencies.clone());
    report.confirm_latency_us = Percentiles::of(confirm_latencies);
    report.publish_rate = report.published as f64 / published_at.as_secs_f64().max(1e-9);
    report.consume_rate = report.consumed as f64 / consumed_at.as_secs_f64().max(1e-9);
    report.seconds = consumed_at.as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu_start);
    let messages = (report.published + report.consumed).max(1);
    report.cpu_us_per_message = cpu.as_secs_f64() * 1e6 / messages as f64;
    let _ = setup.close(200, "bye".into()).await;
    Ok(report)
}

fn record(
    seq: u64,
    latency: Duration,
    result: lapin::Result<lapin::Confirmation>,
    confirmed: &mut Vec<u64>,
    latencies: &mut Vec<u64>,
    nacked: &mut u64,
) {
    match result {
        Ok(c) if c.is_ack() => {
            confirmed.push(seq);
            latencies.push(latency.as_micros() as u64);
        }
        _ => *nacked += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_their_stamp_and_size() {
        let b = encode_body(3, 42, 123_456, 1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(decode_body(&b), Some((3, 42, 123_456)));
        assert_eq!(
            encode_body(1, 1, 1, 4).len(),
            STAMP,
            "never shorter than the stamp"
        );
        assert_eq!(decode_body(b"short"), None);
    }

    #[test]
    fn uris_are_used_in_turn() {
        let list = "amqp://a, amqp://b,amqp://c";
        assert_eq!(nth_uri(list, 0), "amqp://a");
        assert_eq!(nth_uri(list, 1), "amqp://b");
        assert_eq!(nth_uri(list, 5), "amqp://c");
        assert_eq!(nth_uri("amqp://only", 7), "amqp://only");
    }

    #[test]
    fn several_queues_are_numbered() {
        use clap::Parser;
        let one = Options::parse_from(["warren-perf", "--queue", "q"]);
        assert_eq!(queue_names(&one), vec!["q"]);
        let three = Options::parse_from(["warren-perf", "--queue", "q", "--queues", "3"]);
        assert_eq!(queue_names(&three), vec!["q-0", "q-1", "q-2"]);
    }

    #[test]
    fn percentiles() {
        let p = Percentiles::of((1..=100).collect());
        assert_eq!((p.p50, p.p95, p.p99, p.max), (51, 95, 99, 100));
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
    }

    #[test]
    fn queue_arguments_parse_numbers_and_strings() {
        let t = queue_arguments(&["x-queue-type=quorum".into(), "x-max-length=10".into()]).unwrap();
        assert_eq!(
            t.inner().get("x-max-length"),
            Some(&AMQPValue::LongLongInt(10))
        );
        assert!(queue_arguments(&["nonsense".into()]).is_err());
    }
}
