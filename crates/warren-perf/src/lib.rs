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

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use serde::Serialize;
use warren_codec::{
    BasicConsume, BasicPublish, BasicQos, ConfirmSelect, ExchangeDeclare, FieldTable, FieldValue,
    Method, QueueBind, QueueDeclare, ShortStr,
};

mod client;

use client::{Client, Event};

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
    let mut t = FieldTable::new();
    for pair in pairs {
        let (k, v) = pair
            .split_once('=')
            .with_context(|| format!("queue argument '{pair}' is not key=value"))?;
        let value = match v.parse::<i64>() {
            Ok(n) => FieldValue::I64(n),
            Err(_) => FieldValue::from(v),
        };
        t.insert(short(k)?, value);
    }
    Ok(t)
}

fn short(s: &str) -> anyhow::Result<ShortStr> {
    ShortStr::try_from(s).map_err(|e| anyhow::anyhow!("'{s}': {e}"))
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

/// What one producer did.
#[derive(Default)]
struct Produced {
    published: u64,
    confirmed: Vec<u64>,
    latencies: Vec<u64>,
    nacked: u64,
}

/// Writes of more than this many bytes go out before more publishes are encoded.
const WRITE_CHUNK: usize = 256 * 1024;

async fn expect_reply(client: &mut Client, method: Method, what: &str) -> anyhow::Result<()> {
    let sent = method.name();
    let reply = client
        .call(method)
        .await
        .with_context(|| what.to_string())?;
    // Every setup method is answered by the method after it in its class (x.y → x.y-ok).
    let expected = format!("{sent}-ok");
    anyhow::ensure!(
        reply.name() == expected,
        "{what}: expected {expected}, got {}",
        reply.name()
    );
    Ok(())
}

pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let start = Instant::now();
    let cpu_start = cpu_time();
    let deadline = start + Duration::from_secs(opts.duration);
    let args = queue_arguments(&opts.queue_args)?;
    let queues = queue_names(opts);
    let setup_uri = nth_uri(&opts.uri, 0);
    let mut setup = Client::connect(&setup_uri).await?;
    if let Some(exchange) = &opts.exchange {
        if !matches!(opts.exchange_type.as_str(), "fanout" | "direct" | "topic") {
            anyhow::bail!("unsupported --exchange-type {}", opts.exchange_type);
        }
        let declare = ExchangeDeclare {
            exchange: short(exchange)?,
            kind: short(&opts.exchange_type)?,
            durable: true,
            ..Default::default()
        };
        expect_reply(&mut setup, declare.into(), "declaring the exchange").await?;
    }
    for queue in &queues {
        let declare = QueueDeclare {
            queue: short(queue)?,
            durable: true,
            arguments: args.clone(),
            ..Default::default()
        };
        expect_reply(
            &mut setup,
            declare.into(),
            &format!("declaring queue {queue}"),
        )
        .await?;
        if let Some(exchange) = &opts.exchange {
            let bind = QueueBind {
                queue: short(queue)?,
                exchange: short(exchange)?,
                routing_key: short(queue)?,
                ..Default::default()
            };
            expect_reply(&mut setup, bind.into(), &format!("binding queue {queue}")).await?;
        }
    }
    let fanout = opts.exchange.is_some() && opts.exchange_type == "fanout";

    let consumed = Arc::new(Mutex::new(Consumed::default()));
    let (stop_consumers, stop) = tokio::sync::watch::channel(false);
    let consumer_uri = opts
        .consumer_uri
        .clone()
        .unwrap_or_else(|| opts.uri.clone());
    let mut consumer_tasks = Vec::new();
    let stamped = opts.producers > 0;
    for c in 0..opts.consumers {
        let uri = nth_uri(&consumer_uri, c);
        let mut client = Client::connect(&uri).await?;
        let qos = BasicQos {
            prefetch_count: opts.prefetch,
            ..Default::default()
        };
        expect_reply(&mut client, qos.into(), "setting the prefetch").await?;
        let queue_index = (c % queues.len()) as u32;
        let consume = BasicConsume {
            queue: short(&queues[queue_index as usize])?,
            ..Default::default()
        };
        expect_reply(&mut client, consume.into(), "starting a consumer").await?;
        let consumer = Consumer {
            client,
            queue_index,
            multi_ack: opts.multi_ack.max(1),
            stamped,
            start,
            consumed: consumed.clone(),
            stop: stop.clone(),
        };
        consumer_tasks.push(tokio::spawn(async move {
            if let Err(e) = consumer.run().await {
                eprintln!("warren-perf: consumer {c}: {e:#}");
            }
        }));
    }

    let mut producer_tasks = Vec::new();
    for p in 0..opts.producers {
        let uri = nth_uri(&opts.uri, p);
        let mut client = Client::connect(&uri).await?;
        if opts.confirm > 0 {
            expect_reply(
                &mut client,
                ConfirmSelect::default().into(),
                "turning on publisher confirms",
            )
            .await?;
        }
        let publish = BasicPublish {
            exchange: short(opts.exchange.as_deref().unwrap_or(""))?,
            routing_key: short(&queues[p % queues.len()])?,
            ..Default::default()
        };
        let producer = Producer {
            client,
            id: p as u32,
            publish: publish.into(),
            properties: client::properties(opts.persistent),
            opts: opts.clone(),
            start,
            deadline,
        };
        producer_tasks.push(tokio::spawn(producer.run()));
    }

    let mut report = Report::default();
    let mut expected = Vec::new();
    let mut confirm_latencies = Vec::new();
    for (p, t) in producer_tasks.into_iter().enumerate() {
        let produced = t.await?;
        let p = p as u32;
        report.published += produced.published;
        report.confirmed += produced.confirmed.len() as u64;
        report.nacked += produced.nacked;
        confirm_latencies.extend(produced.latencies);
        let targets: Vec<u32> = if fanout {
            (0..queues.len() as u32).collect()
        } else {
            vec![p % queues.len() as u32]
        };
        for s in produced.confirmed {
            expected.extend(targets.iter().map(|q| (*q, p, s)));
        }
    }
    let published_at = start.elapsed();

    // Drain: until every confirmed message came, or as long again as the whole run allows.
    let drain_deadline = Instant::now() + Duration::from_secs(opts.duration);
    loop {
        let done = {
            let c = lock(&consumed);
            if opts.producers == 0 {
                c.seen.len() as u64 >= opts.expect
            } else {
                // The count is the cheap test; the full check runs only once it passes.
                c.seen.len() >= expected.len() && expected.iter().all(|k| c.seen.contains(k))
            }
        };
        if done || Instant::now() >= drain_deadline || opts.consumers == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let consumed_at = start.elapsed();
    let _ = stop_consumers.send(true);
    for t in consumer_tasks {
        let _ = t.await;
    }
    // Every consumer has ended: what they recorded is final.
    let c = std::mem::take(&mut *lock(&consumed));
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
    report.end_to_end_latency_us = Percentiles::of(c.latencies);
    report.confirm_latency_us = Percentiles::of(confirm_latencies);
    report.publish_rate = report.published as f64 / published_at.as_secs_f64().max(1e-9);
    report.consume_rate = report.consumed as f64 / consumed_at.as_secs_f64().max(1e-9);
    report.seconds = consumed_at.as_secs_f64();
    let cpu = cpu_time().saturating_sub(cpu_start);
    let messages = (report.published + report.consumed).max(1);
    report.cpu_us_per_message = cpu.as_secs_f64() * 1e6 / messages as f64;
    setup.close().await;
    Ok(report)
}

fn lock(consumed: &Mutex<Consumed>) -> std::sync::MutexGuard<'_, Consumed> {
    consumed.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One producer's connection: publishes with a window of outstanding confirms (and at a
/// rate, if one is set), reading confirms whenever it waits.
struct Producer {
    client: Client,
    id: u32,
    publish: Method,
    properties: Bytes,
    opts: Options,
    start: Instant,
    deadline: Instant,
}

/// Publishes awaiting their confirm: delivery tag `first_tag + i` is `pending[i]` (its
/// sequence number and send time), `None` once settled. Tags count publishes on the channel
/// from 1, so the queue is indexed by tag.
struct ConfirmWindow {
    first_tag: u64,
    pending: VecDeque<Option<(u64, Duration)>>,
    outstanding: usize,
}

impl ConfirmWindow {
    fn new() -> Self {
        ConfirmWindow {
            first_tag: 1,
            pending: VecDeque::new(),
            outstanding: 0,
        }
    }

    fn push(&mut self, seq: u64, sent: Duration) {
        self.pending.push_back(Some((seq, sent)));
        self.outstanding += 1;
    }

    /// Settles `tag` (and every earlier one if `multiple`); returns what it settled. A tag
    /// already settled, or never published, settles nothing.
    fn settle(&mut self, tag: u64, multiple: bool) -> Vec<(u64, Duration)> {
        let Some(index) = tag
            .checked_sub(self.first_tag)
            .map(|i| i as usize)
            .filter(|i| *i < self.pending.len())
        else {
            return Vec::new();
        };
        let from = if multiple { 0 } else { index };
        let settled: Vec<(u64, Duration)> = self
            .pending
            .range_mut(from..=index)
            .filter_map(Option::take)
            .collect();
        self.outstanding -= settled.len();
        while let Some(None) = self.pending.front() {
            self.pending.pop_front();
            self.first_tag += 1;
        }
        settled
    }
}

impl Producer {
    async fn run(mut self) -> Produced {
        let mut out = Produced::default();
        let mut window = ConfirmWindow::new();
        if let Err(e) = self.publish_all(&mut out, &mut window).await {
            eprintln!("warren-perf: producer {}: {e:#}", self.id);
        }
        // Whatever the broker did not confirm before the connection ended counts as refused.
        out.nacked += window.outstanding as u64;
        self.client.close().await;
        out
    }

    async fn publish_all(
        &mut self,
        out: &mut Produced,
        window: &mut ConfirmWindow,
    ) -> anyhow::Result<()> {
        let opts = self.opts.clone();
        let confirms = opts.confirm > 0;
        let interval = (opts.rate > 0).then(|| Duration::from_secs_f64(1.0 / opts.rate as f64));
        // Confirms still missing when publishing ended are waited for as long again as the run.
        let give_up = self.deadline + Duration::from_secs(opts.duration);
        let mut body = encode_body(self.id, 0, 0, opts.size);
        let mut seq = 0u64;
        loop {
            let mut due = None;
            while seq < opts.count
                && Instant::now() < self.deadline
                && (!confirms || window.outstanding < opts.confirm)
                && self.client.pending() < WRITE_CHUNK
            {
                if let Some(i) = interval {
                    let at = self.start + i * seq as u32;
                    if at > Instant::now() {
                        due = Some(at);
                        break;
                    }
                }
                let sent = self.start.elapsed();
                stamp_body(&mut body, self.id, seq, sent.as_nanos() as u64);
                self.client.publish(&self.publish, &self.properties, &body);
                out.published += 1;
                if confirms {
                    window.push(seq, sent);
                } else {
                    out.confirmed.push(seq);
                }
                seq += 1;
            }
            self.client.flush().await?;
            let publishing = seq < opts.count && Instant::now() < self.deadline;
            if !publishing && window.outstanding == 0 {
                return Ok(());
            }
            if !publishing && Instant::now() >= give_up {
                anyhow::bail!("{} publishes still unconfirmed", window.outstanding);
            }
            let window_full = confirms && window.outstanding >= opts.confirm;
            if publishing && !window_full && due.is_none() {
                // Only the write buffer limit stopped us: keep publishing, but take in what
                // the broker sent meanwhile.
                if confirms {
                    self.take_confirms(out, window)?;
                }
                continue;
            }
            let wake = match due {
                Some(at) if !window_full => at,
                _ if publishing => self.deadline,
                _ => give_up,
            };
            tokio::select! {
                read = self.client.read_more() => read?,
                () = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            }
            self.take_confirms(out, window)?;
        }
    }

    fn take_confirms(
        &mut self,
        out: &mut Produced,
        window: &mut ConfirmWindow,
    ) -> anyhow::Result<()> {
        let now = self.start.elapsed();
        while let Some(event) = self.client.next_event()? {
            match event {
                Event::Confirm { tag, multiple, ack } => {
                    for (seq, sent) in window.settle(tag, multiple) {
                        if ack {
                            out.confirmed.push(seq);
                            out.latencies
                                .push(now.saturating_sub(sent).as_micros() as u64);
                        } else {
                            out.nacked += 1;
                        }
                    }
                }
                Event::Delivery { .. } | Event::Cancelled => {}
            }
        }
        Ok(())
    }
}

/// Rewrites the stamp at the start of a body made by [`encode_body`].
fn stamp_body(body: &mut [u8], producer: u32, seq: u64, sent_ns: u64) {
    body[0..4].copy_from_slice(&producer.to_be_bytes());
    body[4..12].copy_from_slice(&seq.to_be_bytes());
    body[12..20].copy_from_slice(&sent_ns.to_be_bytes());
}

/// One consumer's connection: acks every delivery (or every `multi_ack`-th, with multiple)
/// and records what came, until told to stop.
struct Consumer {
    client: Client,
    queue_index: u32,
    multi_ack: u64,
    stamped: bool,
    start: Instant,
    consumed: Arc<Mutex<Consumed>>,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl Consumer {
    async fn run(mut self) -> anyhow::Result<()> {
        let mut since_ack = 0u64;
        let mut arrived: Vec<(Key, u64)> = Vec::new();
        let result = loop {
            if *self.stop.borrow() {
                break Ok(());
            }
            tokio::select! {
                read = self.client.read_more() => if let Err(e) = read { break Err(e) },
                _ = self.stop.changed() => break Ok(()),
            }
            let now = self.start.elapsed().as_nanos() as u64;
            let mut cancelled = false;
            loop {
                match self.client.next_event() {
                    Ok(Some(Event::Delivery { tag, body })) => {
                        if let Some((producer, seq, sent)) = decode_body(&body) {
                            arrived.push((
                                (self.queue_index, producer, seq),
                                now.saturating_sub(sent) / 1000,
                            ));
                        }
                        since_ack += 1;
                        if self.multi_ack == 1 {
                            self.client.ack(tag, false);
                        } else if since_ack >= self.multi_ack {
                            self.client.ack(tag, true);
                            since_ack = 0;
                        }
                    }
                    Ok(Some(Event::Cancelled)) => cancelled = true,
                    Ok(Some(Event::Confirm { .. })) => {}
                    Ok(None) => break,
                    Err(e) => return Err(e),
                }
            }
            if !arrived.is_empty() {
                let mut c = lock(&self.consumed);
                for (key, latency) in arrived.drain(..) {
                    if c.seen.insert(key) {
                        // A backlog left by an earlier run carries another run's clock.
                        if self.stamped {
                            c.latencies.push(latency);
                        }
                    } else {
                        c.duplicates += 1;
                    }
                }
            }
            if let Err(e) = self.client.flush().await {
                break Err(e);
            }
            if cancelled {
                break Err(anyhow::anyhow!("the broker cancelled the consumer"));
            }
        };
        self.client.close().await;
        result
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
    fn confirms_settle_one_tag_or_every_earlier_one() {
        let mut w = ConfirmWindow::new();
        for seq in 0..5 {
            w.push(seq, Duration::from_micros(seq));
        }
        let seqs = |v: Vec<(u64, Duration)>| v.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
        // Tags count from 1: tag 3 is the third publish (seq 2).
        assert_eq!(seqs(w.settle(3, false)), vec![2]);
        assert_eq!(w.outstanding, 4);
        assert_eq!(seqs(w.settle(3, false)), Vec::<u64>::new(), "settled once");
        assert_eq!(seqs(w.settle(4, true)), vec![0, 1, 3]);
        assert_eq!((w.outstanding, w.first_tag), (1, 5));
        assert_eq!(
            seqs(w.settle(2, true)),
            Vec::<u64>::new(),
            "already settled"
        );
        assert_eq!(
            seqs(w.settle(9, true)),
            Vec::<u64>::new(),
            "never published"
        );
        assert_eq!(seqs(w.settle(5, false)), vec![4]);
        assert_eq!((w.outstanding, w.pending.len()), (0, 0));
    }

    #[test]
    fn stamps_are_rewritten_in_place() {
        let mut b = encode_body(1, 0, 0, 100);
        stamp_body(&mut b, 7, 99, 12345);
        assert_eq!(decode_body(&b), Some((7, 99, 12345)));
        assert_eq!(b.len(), 100);
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
        assert_eq!(t.get("x-max-length"), Some(&FieldValue::I64(10)));
        assert_eq!(
            t.get("x-queue-type").and_then(FieldValue::as_str),
            Some("quorum")
        );
        assert!(queue_arguments(&["nonsense".into()]).is_err());
    }
}
