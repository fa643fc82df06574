//! The AMQP workload: producers with publisher confirms and consumers with manual acks,
//! against several replicated queues and two exchanges, recording every operation in the
//! history (`history.rs`).
//!
//! Topology: durable queues `chaos-q1..qK`, each declared through a different node (the
//! declaring node is the queue's preferred leader, so leaders differ); a direct exchange
//! `chaos-direct` routing `k1` to q1 and `k2` to q2; a fanout `chaos-fanout` to the last two
//! queues. A producer picks a route per message (the default exchange to any queue, or one
//! of the exchanges), publishes persistent and mandatory, and keeps a bounded window of
//! unconfirmed publishes. Consumers (several per queue, on different nodes) ack most
//! deliveries and nack or reject some with requeue, so redelivery is exercised; in drain
//! mode they ack everything. Transactional producers publish two or three messages (random
//! routes) per `tx.commit`, recording the transaction on each publish so the checker can
//! tell that it took effect whole or not at all. Every client reconnects on any error to the next node in the
//! shared address list (`cluster::Targets`), with a new session number.
//!
//! `run.rs` starts and stops the workload around the nemesis; `checker.rs` judges the
//! history it leaves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::cluster::{Targets, amqp_url};
use crate::history::{self, History, Op, OpType};

/// Bound for connecting, opening a channel and any synchronous AMQP method.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A confirm that takes longer than this is given up on (recorded `info`) and the producer
/// moves to another node: the broker may be holding it in a minority.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(20);
/// A consumer that receives nothing for this long reconnects (a safety net next to the
/// AMQP heartbeat, recorded so silent stalls show in the history).
pub(crate) const IDLE_RECONNECT: Duration = Duration::from_secs(20);
/// Unconfirmed publishes a producer may have out at once.
const WINDOW: usize = 16;
const PREFETCH: u16 = 10;

pub const DIRECT: &str = "chaos-direct";
pub const FANOUT: &str = "chaos-fanout";

#[derive(Clone, Debug)]
pub struct Route {
    pub exchange: String,
    pub key: String,
    pub targets: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Topology {
    pub queues: Vec<String>,
    pub routes: Vec<Route>,
}

/// `queues` (at least 2) queues, the direct and the fanout exchange, and the routes.
pub fn topology(queues: usize) -> Topology {
    let queues: Vec<String> = (1..=queues.max(2)).map(|i| format!("chaos-q{i}")).collect();
    let mut routes: Vec<Route> = queues
        .iter()
        .map(|q| Route {
            exchange: String::new(),
            key: q.clone(),
            targets: vec![q.clone()],
        })
        .collect();
    routes.push(Route {
        exchange: DIRECT.into(),
        key: "k1".into(),
        targets: vec![queues[0].clone()],
    });
    routes.push(Route {
        exchange: DIRECT.into(),
        key: "k2".into(),
        targets: vec![queues[1].clone()],
    });
    routes.push(Route {
        exchange: FANOUT.into(),
        key: String::new(),
        targets: queues[queues.len() - 2..].to_vec(),
    });
    Topology { queues, routes }
}

async fn within<T>(
    what: &str,
    f: impl std::future::Future<Output = lapin::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => bail!("{what}: {e}"),
        Err(_) => bail!("{what}: timed out"),
    }
}

async fn connect(node: u64) -> anyhow::Result<(Connection, Channel)> {
    let conn = within(
        "connect",
        Connection::connect(&amqp_url(node), ConnectionProperties::default()),
    )
    .await?;
    match within("channel.open", conn.create_channel()).await {
        Ok(ch) => Ok((conn, ch)),
        Err(e) => {
            close_later(conn);
            Err(e)
        }
    }
}

/// Closes a connection without waiting for it (a dead peer would hold the caller up).
fn close_later(conn: Connection) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(CALL_TIMEOUT, conn.close(200, "bye".into())).await;
    });
}

/// Declares the topology, queue `i` through node `nodes[i % len]` and the exchanges and
/// bindings through others, then checks that every node sees all of it.
pub async fn declare(top: &Topology, nodes: &[u64], history: &History) -> anyhow::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (i, q) in top.queues.iter().enumerate() {
        let node = nodes[i % nodes.len()];
        let (conn, ch) = connect(node).await?;
        within(
            "queue.declare",
            ch.queue_declare(q.as_str().into(), durable, FieldTable::default()),
        )
        .await
        .with_context(|| format!("declare {q} through node {node}"))?;
        history.record(
            Op::new("setup", OpType::Ok, "declare-queue")
                .queue(q)
                .node(node),
        );
        close_later(conn);
    }
    let node = nodes[top.queues.len() % nodes.len()];
    let (conn, ch) = connect(node).await?;
    for (name, kind) in [
        (DIRECT, lapin::ExchangeKind::Direct),
        (FANOUT, lapin::ExchangeKind::Fanout),
    ] {
        let opts = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        within(
            "exchange.declare",
            ch.exchange_declare(name.into(), kind, opts, FieldTable::default()),
        )
        .await?;
    }
    for r in top.routes.iter().filter(|r| !r.exchange.is_empty()) {
        for q in &r.targets {
            within(
                "queue.bind",
                ch.queue_bind(
                    q.as_str().into(),
                    r.exchange.as_str().into(),
                    r.key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }
    }
    history.record(Op::new("setup", OpType::Ok, "declare-exchanges").node(node));
    close_later(conn);
    for node in nodes {
        verify_topology(top, *node)
            .await
            .with_context(|| format!("node {node} does not see the topology"))?;
    }
    Ok(())
}

/// Passive declares of every queue and exchange of the topology through `node`.
pub async fn verify_topology(top: &Topology, node: u64) -> anyhow::Result<()> {
    let (conn, ch) = connect(node).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let mut result = Ok(());
    for q in &top.queues {
        if let Err(e) = within(
            "passive queue.declare",
            ch.queue_declare(q.as_str().into(), passive, FieldTable::default()),
        )
        .await
        {
            result = Err(e.context(format!("queue {q}")));
            break;
        }
    }
    if result.is_ok() {
        for name in [DIRECT, FANOUT] {
            let opts = ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            if let Err(e) = within(
                "passive exchange.declare",
                ch.exchange_declare(
                    name.into(),
                    lapin::ExchangeKind::Direct,
                    opts,
                    FieldTable::default(),
                ),
            )
            .await
            {
                result = Err(e.context(format!("exchange {name}")));
                break;
            }
        }
    }
    close_later(conn);
    result
}

#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    pub producers: u32,
    pub tx_producers: u32,
    pub consumers_per_queue: u32,
    /// Publishes per second, all producers together.
    pub rate: f64,
    pub seed: u64,
    pub run_tag: String,
}

/// Flags the run flips to move the workload through its phases.
#[derive(Default)]
struct Control {
    publishing: AtomicBool,
    consuming: AtomicBool,
    draining: AtomicBool,
    /// Milliseconds (history clock) of the latest delivery.
    last_delivery_ms: AtomicU64,
    idle_reconnects: AtomicU64,
}

pub struct Workload {
    control: Arc<Control>,
    producers: Vec<JoinHandle<()>>,
    consumers: Vec<JoinHandle<()>>,
    history: Arc<History>,
}

impl Workload {
    pub fn start(
        opts: &WorkloadOptions,
        top: &Topology,
        targets: Targets,
        history: Arc<History>,
    ) -> Workload {
        let control = Arc::new(Control::default());
        control.publishing.store(true, Ordering::SeqCst);
        control.consuming.store(true, Ordering::SeqCst);
        let mut consumers = Vec::new();
        for (qi, q) in top.queues.iter().enumerate() {
            for j in 0..opts.consumers_per_queue {
                let c = Consumer {
                    process: format!("consumer-{}-{}", q.trim_start_matches("chaos-"), j + 1),
                    queue: q.clone(),
                    first_node: qi + j as usize + 1,
                    run_tag: opts.run_tag.clone(),
                    rng: ChaCha8Rng::seed_from_u64(
                        opts.seed ^ (0xc0 + (qi as u64) * 16 + j as u64),
                    ),
                    targets: targets.clone(),
                    control: control.clone(),
                    history: history.clone(),
                };
                consumers.push(tokio::spawn(c.run()));
            }
        }
        let period = Duration::from_secs_f64(opts.producers as f64 / opts.rate.max(0.1));
        let tx_period = Duration::from_millis(200);
        let mut producers: Vec<JoinHandle<()>> = (1..=opts.producers)
            .map(|p| {
                let pr = Producer {
                    id: p,
                    process: format!("producer-{p}"),
                    first_node: p as usize - 1,
                    period,
                    routes: top.routes.clone(),
                    run_tag: opts.run_tag.clone(),
                    rng: ChaCha8Rng::seed_from_u64(opts.seed ^ (0x9e37 + p as u64)),
                    targets: targets.clone(),
                    control: control.clone(),
                    history: history.clone(),
                };
                tokio::spawn(pr.run())
            })
            .collect();
        for t in 1..=opts.tx_producers {
            // Numbered after the confirming producers so message ids stay unique.
            let p = opts.producers + t;
            let pr = Producer {
                id: p,
                process: format!("tx-producer-{t}"),
                first_node: t as usize,
                period: tx_period,
                routes: top.routes.clone(),
                run_tag: opts.run_tag.clone(),
                rng: ChaCha8Rng::seed_from_u64(opts.seed ^ (0x7a11 + p as u64)),
                targets: targets.clone(),
                control: control.clone(),
                history: history.clone(),
            };
            producers.push(tokio::spawn(pr.run_transactional()));
        }
        Workload {
            control,
            producers,
            consumers,
            history,
        }
    }

    /// Stops publishing and waits (bounded) for every outstanding confirm.
    pub async fn stop_producers(&mut self) {
        self.control.publishing.store(false, Ordering::SeqCst);
        for p in self.producers.drain(..) {
            let abort = p.abort_handle();
            if tokio::time::timeout(CONFIRM_TIMEOUT + Duration::from_secs(10), p)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// From now on consumers ack every delivery.
    pub fn drain_mode(&self) {
        self.control.draining.store(true, Ordering::SeqCst);
    }

    /// Milliseconds since the latest delivery (history clock).
    pub fn quiet_for_ms(&self) -> u64 {
        self.history
            .now_ms()
            .saturating_sub(self.control.last_delivery_ms.load(Ordering::SeqCst))
    }

    pub fn idle_reconnects(&self) -> u64 {
        self.control.idle_reconnects.load(Ordering::SeqCst)
    }

    pub async fn stop_consumers(&mut self) {
        self.control.consuming.store(false, Ordering::SeqCst);
        for c in self.consumers.drain(..) {
            let abort = c.abort_handle();
            if tokio::time::timeout(Duration::from_secs(15), c)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

struct Producer {
    id: u32,
    process: String,
    first_node: usize,
    period: Duration,
    routes: Vec<Route>,
    run_tag: String,
    rng: ChaCha8Rng,
    targets: Targets,
    control: Arc<Control>,
    history: Arc<History>,
}

impl Producer {
    async fn run(mut self) {
        let mut seq = 0u64;
        let mut session = 0u64;
        let mut next_node = self.first_node;
        let window = Arc::new(Semaphore::new(WINDOW));
        while self.control.publishing.load(Ordering::SeqCst) {
            let nodes = self.targets.get();
            if nodes.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let node = nodes[next_node % nodes.len()];
            next_node += 1;
            session += 1;
            let (conn, ch) = match connect(node).await {
                Ok(c) => c,
                Err(e) => {
                    self.history.record(
                        Op::new(&self.process, OpType::Fail, "connect")
                            .node(node)
                            .session(session)
                            .value(e.to_string()),
                    );
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            };
            if let Err(e) = within(
                "confirm.select",
                ch.confirm_select(ConfirmSelectOptions::default()),
            )
            .await
            {
                self.history.record(
                    Op::new(&self.process, OpType::Fail, "connect")
                        .node(node)
                        .session(session)
                        .value(e.to_string()),
                );
                close_later(conn);
                continue;
            }
            self.history.record(
                Op::new(&self.process, OpType::Ok, "connect")
                    .node(node)
                    .session(session),
            );
            let broken = Arc::new(AtomicBool::new(false));
            let mut tick = tokio::time::interval(self.period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while self.control.publishing.load(Ordering::SeqCst) && !broken.load(Ordering::SeqCst) {
                tick.tick().await;
                let permit = match tokio::time::timeout(
                    Duration::from_secs(1),
                    window.clone().acquire_owned(),
                )
                .await
                {
                    Ok(Ok(p)) => p,
                    _ => continue,
                };
                seq += 1;
                let route = &self.routes[self.rng.random_range(0..self.routes.len())];
                let msg = history::msg_id(self.id, seq);
                let body = history::body(&self.run_tag, self.id, session, seq);
                self.history.record(
                    Op::new(&self.process, OpType::Invoke, "publish")
                        .node(node)
                        .session(session)
                        .msg(&msg)
                        .targets(&route.targets),
                );
                let published = tokio::time::timeout(
                    CALL_TIMEOUT,
                    ch.basic_publish(
                        route.exchange.as_str().into(),
                        route.key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        body.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    ),
                )
                .await;
                let confirm = match published {
                    Ok(Ok(c)) => c,
                    other => {
                        let why = match other {
                            Ok(Err(e)) => e.to_string(),
                            _ => "publish timed out".to_owned(),
                        };
                        self.history.record(
                            Op::new(&self.process, OpType::Info, "publish")
                                .node(node)
                                .session(session)
                                .msg(&msg)
                                .value(why),
                        );
                        broken.store(true, Ordering::SeqCst);
                        break;
                    }
                };
                let history = self.history.clone();
                let process = self.process.clone();
                let broken2 = broken.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let op = |kind| {
                        Op::new(&process, kind, "publish")
                            .node(node)
                            .session(session)
                            .msg(&msg)
                    };
                    match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
                        Ok(Ok(Confirmation::Ack(None))) => history.record(op(OpType::Ok)),
                        Ok(Ok(Confirmation::Ack(Some(ret)))) => {
                            history.record(op(OpType::Fail).value(serde_json::json!({
                                "returned": true,
                                "reply_code": ret.reply_code,
                                "reply_text": ret.reply_text.to_string(),
                            })))
                        }
                        Ok(Ok(Confirmation::Nack(_))) => history
                            .record(op(OpType::Fail).value(serde_json::json!({"nack": true}))),
                        Ok(Ok(Confirmation::NotRequested)) => {
                            history.record(op(OpType::Info).value("confirm not requested"))
                        }
                        Ok(Err(e)) => {
                            broken2.store(true, Ordering::SeqCst);
                            history.record(op(OpType::Info).value(e.to_string()))
                        }
                        Err(_) => {
                            broken2.store(true, Ordering::SeqCst);
                            history.record(op(OpType::Info).value("confirm timed out"))
                        }
                    }
                });
            }
            if !self.control.publishing.load(Ordering::SeqCst) {
                // Let the outstanding confirms arrive before closing (each is bounded).
                let _ = tokio::time::timeout(
                    CONFIRM_TIMEOUT + Duration::from_secs(2),
                    window.acquire_many(WINDOW as u32),
                )
                .await;
            }
            self.history.record(
                Op::new(&self.process, OpType::Info, "disconnect")
                    .node(node)
                    .session(session),
            );
            close_later(conn);
        }
        // Let confirm tasks of a broken last session record their outcome.
        let _ = tokio::time::timeout(
            CONFIRM_TIMEOUT + Duration::from_secs(2),
            window.acquire_many(WINDOW as u32),
        )
        .await;
    }
}

impl Producer {
    /// Publishes in transactions: a few messages, then tx.commit. A commit-ok makes each of
    /// them `ok`; a failed or timed-out commit (or a failed publish before it) makes each
    /// `info`, and the producer reconnects.
    async fn run_transactional(mut self) {
        let mut seq = 0u64;
        let mut session = 0u64;
        let mut commits = 0u64;
        let mut next_node = self.first_node;
        while self.control.publishing.load(Ordering::SeqCst) {
            let nodes = self.targets.get();
            if nodes.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let node = nodes[next_node % nodes.len()];
            next_node += 1;
            session += 1;
            let connected = match connect(node).await {
                Ok((conn, ch)) => match within("tx.select", ch.tx_select()).await {
                    Ok(()) => Ok((conn, ch)),
                    Err(e) => {
                        close_later(conn);
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            let (conn, ch) = match connected {
                Ok(c) => c,
                Err(e) => {
                    self.history.record(
                        Op::new(&self.process, OpType::Fail, "connect")
                            .node(node)
                            .session(session)
                            .value(e.to_string()),
                    );
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            };
            self.history.record(
                Op::new(&self.process, OpType::Ok, "connect")
                    .node(node)
                    .session(session),
            );
            let mut tick = tokio::time::interval(self.period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while self.control.publishing.load(Ordering::SeqCst) {
                tick.tick().await;
                commits += 1;
                let tx = format!("{}/{session}/{commits}", self.process);
                let mut msgs = Vec::new();
                let mut broken = None;
                for _ in 0..self.rng.random_range(2..=3) {
                    seq += 1;
                    let route = &self.routes[self.rng.random_range(0..self.routes.len())];
                    let msg = history::msg_id(self.id, seq);
                    let body = history::body(&self.run_tag, self.id, session, seq);
                    self.history.record(
                        Op::new(&self.process, OpType::Invoke, "publish")
                            .node(node)
                            .session(session)
                            .msg(&msg)
                            .targets(&route.targets)
                            .value(serde_json::json!({ "tx": tx })),
                    );
                    msgs.push(msg);
                    let published = within(
                        "basic.publish",
                        ch.basic_publish(
                            route.exchange.as_str().into(),
                            route.key.as_str().into(),
                            BasicPublishOptions::default(),
                            body.as_bytes(),
                            BasicProperties::default().with_delivery_mode(2),
                        ),
                    )
                    .await;
                    if let Err(e) = published {
                        broken = Some(e.to_string());
                        break;
                    }
                }
                let outcome = match broken {
                    Some(e) => Err(e),
                    None => match tokio::time::timeout(CONFIRM_TIMEOUT, ch.tx_commit()).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(format!("tx.commit: {e}")),
                        Err(_) => Err("tx.commit timed out".to_owned()),
                    },
                };
                let failed = outcome.is_err();
                let kind = if failed { OpType::Info } else { OpType::Ok };
                for msg in &msgs {
                    let mut op = Op::new(&self.process, kind, "publish")
                        .node(node)
                        .session(session)
                        .msg(msg);
                    if let Err(e) = &outcome {
                        op = op.value(e.clone());
                    }
                    self.history.record(op);
                }
                if failed {
                    break;
                }
            }
            self.history.record(
                Op::new(&self.process, OpType::Info, "disconnect")
                    .node(node)
                    .session(session),
            );
            close_later(conn);
        }
    }
}

struct Consumer {
    process: String,
    queue: String,
    first_node: usize,
    run_tag: String,
    rng: ChaCha8Rng,
    targets: Targets,
    control: Arc<Control>,
    history: Arc<History>,
}

enum Settle {
    Ack,
    Nack,
    Reject,
}

impl Consumer {
    async fn run(mut self) {
        let mut session = 0u64;
        let mut next_node = self.first_node;
        while self.control.consuming.load(Ordering::SeqCst) {
            let nodes = self.targets.get();
            if nodes.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let node = nodes[next_node % nodes.len()];
            next_node += 1;
            session += 1;
            match self.session(node, session).await {
                Ok(()) => {}
                Err(e) => {
                    self.history.record(
                        Op::new(&self.process, OpType::Info, "consume-end")
                            .node(node)
                            .session(session)
                            .queue(&self.queue)
                            .value(format!("{e:#}")),
                    );
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }

    /// One connection's worth of consuming; returns when told to stop, or with the reason
    /// the connection is no good any more.
    async fn session(&mut self, node: u64, session: u64) -> anyhow::Result<()> {
        let (conn, ch) = connect(node).await?;
        let setup = async {
            within(
                "basic.qos",
                ch.basic_qos(PREFETCH, BasicQosOptions::default()),
            )
            .await?;
            within(
                "basic.consume",
                ch.basic_consume(
                    self.queue.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await
        };
        let mut consumer = match setup.await {
            Ok(c) => c,
            Err(e) => {
                close_later(conn);
                return Err(e);
            }
        };
        self.history.record(
            Op::new(&self.process, OpType::Ok, "consume")
                .node(node)
                .session(session)
                .queue(&self.queue),
        );
        let mut last = Instant::now();
        let result = loop {
            if !self.control.consuming.load(Ordering::SeqCst) {
                break Ok(());
            }
            let next = match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
                Err(_) => {
                    if last.elapsed() > IDLE_RECONNECT {
                        self.control.idle_reconnects.fetch_add(1, Ordering::SeqCst);
                        break Err(anyhow::anyhow!("no delivery for {IDLE_RECONNECT:?}"));
                    }
                    continue;
                }
                Ok(n) => n,
            };
            let delivery = match next {
                None => break Err(anyhow::anyhow!("consumer stream ended (cancelled)")),
                Some(Err(e)) => break Err(anyhow::anyhow!("delivery error: {e}")),
                Some(Ok(d)) => d,
            };
            last = Instant::now();
            self.control
                .last_delivery_ms
                .store(self.history.now_ms(), Ordering::SeqCst);
            let parsed = history::parse_body(&delivery.data);
            let mut op = Op::new(&self.process, OpType::Ok, "deliver")
                .node(node)
                .session(session)
                .queue(&self.queue)
                .redelivered(delivery.redelivered);
            let msg = match &parsed {
                Some((tag, id, psession)) if *tag == self.run_tag => {
                    op = op.msg(id).value(serde_json::json!({
                        "producer_session": psession,
                        "tag": delivery.delivery_tag,
                    }));
                    Some(id.clone())
                }
                _ => {
                    let text = String::from_utf8_lossy(&delivery.data);
                    op = op.value(text.chars().take(80).collect::<String>());
                    None
                }
            };
            self.history.record(op);
            let draining = self.control.draining.load(Ordering::SeqCst);
            let action = if draining || msg.is_none() {
                Settle::Ack
            } else {
                match self.rng.random_range(0..100) {
                    0..6 => Settle::Nack,
                    6..12 => Settle::Reject,
                    _ => Settle::Ack,
                }
            };
            let (f, res) = match action {
                Settle::Ack => (
                    "ack",
                    tokio::time::timeout(CALL_TIMEOUT, delivery.ack(BasicAckOptions::default()))
                        .await,
                ),
                Settle::Nack => (
                    "nack",
                    tokio::time::timeout(
                        CALL_TIMEOUT,
                        delivery.nack(BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        }),
                    )
                    .await,
                ),
                Settle::Reject => (
                    "reject",
                    tokio::time::timeout(
                        CALL_TIMEOUT,
                        delivery.reject(BasicRejectOptions { requeue: true }),
                    )
                    .await,
                ),
            };
            let mut op = Op::new(&self.process, OpType::Ok, f)
                .node(node)
                .session(session)
                .queue(&self.queue);
            if let Some(m) = &msg {
                op = op.msg(m);
            }
            match res {
                Ok(Ok(_)) => self.history.record(op),
                Ok(Err(e)) => {
                    op.kind = Some(OpType::Info);
                    self.history.record(op.value(e.to_string()));
                    break Err(anyhow::anyhow!("{f} failed: {e}"));
                }
                Err(_) => {
                    op.kind = Some(OpType::Info);
                    self.history.record(op.value("timed out"));
                    break Err(anyhow::anyhow!("{f} timed out"));
                }
            }
        };
        close_later(conn);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_is_reachable_and_the_fanout_reaches_two() {
        let t = topology(4);
        assert_eq!(t.queues.len(), 4);
        for q in &t.queues {
            assert!(t.routes.iter().any(|r| r.targets == vec![q.clone()]));
        }
        let fanout = t.routes.iter().find(|r| r.exchange == FANOUT).unwrap();
        assert_eq!(fanout.targets, vec!["chaos-q3", "chaos-q4"]);
    }
}
