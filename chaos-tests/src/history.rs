//! The history of a run: every operation the workload and the nemesis performed, as JSON
//! lines in `history.jsonl`, in the style of a Jepsen history.
//!
//! An operation is recorded when it is invoked (`invoke`) and again when its outcome is
//! known: `ok` (it happened: a publish was confirmed, a delivery arrived, an ack was sent),
//! `fail` (it certainly did not happen as asked: a nack or a returned publish) or `info`
//! (unknown: the connection died before the confirm). Deliveries have no invocation; they
//! are single `ok` records. The workload (`workload.rs`) and the nemesis (`nemesis.rs`) write
//! here; the checker (`checker.rs`) reads the file back, so `chaos check DIR` can re-check
//! any stored run.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Jepsen's operation types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One line of the history. Fields that do not apply to an operation are left out of the
/// JSON.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Op {
    /// Position in the history, from 0.
    #[serde(default)]
    pub index: u64,
    /// Milliseconds since the run started.
    #[serde(default)]
    pub time_ms: u64,
    /// Who did it: `producer-2`, `consumer-q1-1`, `nemesis`, `setup`.
    pub process: String,
    #[serde(rename = "type")]
    pub kind: Option<OpType>,
    /// What was done: `publish`, `deliver`, `ack`, `nack`, `reject`, `connect`, `fault`,
    /// `heal`, ...
    pub f: String,
    /// The node the client was connected to (or the nemesis acted on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    /// The client's connection number within its process (a new one after every reconnect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    /// Message id, `p<producer>-<seq>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg: Option<String>,
    /// The queue a delivery came from or a consumer reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// The queues a publish routes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivered: Option<bool>,
    /// Free-form detail: the error, the fault and its resolved targets, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

impl Op {
    pub fn new(process: &str, kind: OpType, f: &str) -> Op {
        Op {
            process: process.to_owned(),
            kind: Some(kind),
            f: f.to_owned(),
            ..Op::default()
        }
    }

    pub fn node(mut self, node: u64) -> Op {
        self.node = Some(node);
        self
    }

    pub fn session(mut self, session: u64) -> Op {
        self.session = Some(session);
        self
    }

    pub fn msg(mut self, msg: &str) -> Op {
        self.msg = Some(msg.to_owned());
        self
    }

    pub fn queue(mut self, queue: &str) -> Op {
        self.queue = Some(queue.to_owned());
        self
    }

    pub fn targets(mut self, targets: &[String]) -> Op {
        self.targets = Some(targets.to_vec());
        self
    }

    pub fn redelivered(mut self, r: bool) -> Op {
        self.redelivered = Some(r);
        self
    }

    pub fn value(mut self, v: impl Into<serde_json::Value>) -> Op {
        self.value = Some(v.into());
        self
    }
}

/// The run's history file, shared by every client task and the nemesis. Lines are flushed
/// as they are written so a run that is interrupted still leaves its history behind.
pub struct History {
    start: Instant,
    inner: Mutex<Inner>,
}

struct Inner {
    next: u64,
    out: BufWriter<File>,
}

impl History {
    pub fn create(path: &Path, start: Instant) -> anyhow::Result<History> {
        let file = File::create(path)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        Ok(History {
            start,
            inner: Mutex::new(Inner {
                next: 0,
                out: BufWriter::new(file),
            }),
        })
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Appends `op` with the next index and the current time.
    pub fn record(&self, mut op: Op) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        op.index = inner.next;
        op.time_ms = self.now_ms();
        inner.next += 1;
        if let Ok(line) = serde_json::to_string(&op) {
            // A full disk under the run directory must not stop the run; the checker then
            // reports on what was written.
            let _ = writeln!(inner.out, "{line}");
        }
    }

    pub fn flush(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let _ = inner.out.flush();
    }
}

/// Reads a history file back, skipping nothing: a malformed line is an error (it would
/// otherwise hide operations from the checker).
pub fn read(path: &Path) -> anyhow::Result<Vec<Op>> {
    let file =
        File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut ops = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let op: Op = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), n + 1))?;
        ops.push(op);
    }
    Ok(ops)
}

/// A message id: which producer published it and its sequence number there.
pub fn msg_id(producer: u32, seq: u64) -> String {
    format!("p{producer}-{seq}")
}

/// The producer and sequence number of a message id made by [`msg_id`].
pub fn parse_msg_id(id: &str) -> Option<(u32, u64)> {
    let rest = id.strip_prefix('p')?;
    let (p, s) = rest.split_once('-')?;
    Some((p.parse().ok()?, s.parse().ok()?))
}

/// The body of a published message: the run's tag, the message id and the producer's
/// session (for the order check), then padding so bodies are not trivially small.
pub fn body(run_tag: &str, producer: u32, session: u64, seq: u64) -> String {
    format!(
        "chaos {run_tag} {} s{session} {}",
        msg_id(producer, seq),
        "x".repeat(64)
    )
}

/// What a consumer reads back out of a body: the run tag, the message id and the
/// producer's session. `None` for a body the harness did not write.
pub fn parse_body(body: &[u8]) -> Option<(String, String, u64)> {
    let text = std::str::from_utf8(body).ok()?;
    let mut parts = text.split(' ');
    if parts.next()? != "chaos" {
        return None;
    }
    let tag = parts.next()?.to_owned();
    let id = parts.next()?.to_owned();
    parse_msg_id(&id)?;
    let session = parts.next()?.strip_prefix('s')?.parse().ok()?;
    Some((tag, id, session))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip() {
        let b = body("s42", 3, 7, 1001);
        assert_eq!(
            parse_body(b.as_bytes()),
            Some(("s42".to_owned(), "p3-1001".to_owned(), 7))
        );
        assert_eq!(parse_body(b"hello"), None);
        assert_eq!(parse_body(b"chaos s1 q3-1 s0"), None);
        assert_eq!(parse_msg_id("p12-5"), Some((12, 5)));
    }

    #[test]
    fn ops_round_trip_through_a_file() {
        let dir = std::env::temp_dir().join(format!("chaos-history-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.jsonl");
        let h = History::create(&path, Instant::now()).unwrap();
        h.record(
            Op::new("producer-1", OpType::Invoke, "publish")
                .msg("p1-1")
                .targets(&["q1".to_owned()]),
        );
        h.record(Op::new("producer-1", OpType::Ok, "publish").msg("p1-1"));
        h.flush();
        let ops = read(&path).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1].index, 1);
        assert_eq!(ops[0].kind, Some(OpType::Invoke));
        assert_eq!(ops[0].targets.as_deref(), Some(&["q1".to_owned()][..]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
