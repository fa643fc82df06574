//! openraft's state machine for one replicated queue: applies committed queue commands to the
//! pure `QueueState` and keeps message bodies in RocksDB.
//!
//! The index of the queue (`QueueState`) lives in memory and in snapshots, up to its page
//! window of ready messages; the index entries of the ready messages beyond it are paged out
//! to the `sm` column family (`PageOut`) and come back through the log (`PageIn`, read here
//! by the leader).
//!
//! Bodies: the log holds every body until a snapshot lets it be purged, so a body only has to
//! be in the `sm` column family once a snapshot covers its enqueue. Until then it stays in
//! memory ([`UnwrittenBody`]); building a snapshot writes the bodies of the messages still live
//! (before the snapshot itself, whose synced write makes them durable), and a message settled
//! before that — most of them, under a consumer that keeps up — never reaches RocksDB at all
//! (before, every message cost a 1 KB put and a delete in the WAL and the memtables). Memory
//! stays bounded: snapshots come every `raft.snapshot_every` entries, and snapshots stay small
//! however deep the queue, since bodies are never in them. After a crash the node loads the
//! last snapshot and openraft re-applies the log after it: enqueues bring their bodies back
//! into memory and settlements drop them; a body re-applied from the log may also be on disk
//! (written for a snapshot that was not saved, or by an earlier version), so its settlement
//! deletes it there too. Deliveries and releases go through the queue's `QueueHandle`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{self, Cursor};
use std::sync::{Arc, Weak};

use futures::TryStreamExt;
use openraft::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StoredMembership};
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use warren_core::queue::{Effect, PagedEntry, QueueCmd, QueueReply, QueueState};
use warren_core::{MessageContent, MsgId};

use crate::db::keys;
use crate::db::{CF_SM, CF_SNAPSHOT, GroupId, MemoryBudget, MemoryShare, Storage, decode, encode};
use crate::queue::{Bodies, QueueHandle, ReplyTo};
use crate::types::{GroupRequest, GroupResponse, QueueOutcome, QueueRequest, TypeConfig};

const SNAPSHOT_TAG: &[u8] = b"current";

/// A snapshot as stored in the `snapshot` column family: openraft's metadata plus the
/// serialized state.
#[derive(Serialize, Deserialize)]
pub(crate) struct StoredSnapshot {
    pub meta: SnapshotMetaOf<TypeConfig>,
    pub data: Vec<u8>,
}

pub(crate) fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

pub(crate) fn load_snapshot(
    storage: &Storage,
    group: GroupId,
) -> io::Result<Option<StoredSnapshot>> {
    let key = keys::group_key(group, SNAPSHOT_TAG);
    match storage
        .db()
        .get_cf(storage.cf(CF_SNAPSHOT), key)
        .map_err(io_err)?
    {
        Some(bytes) => Ok(Some(decode(&bytes).map_err(io_err)?)),
        None => Ok(None),
    }
}

/// Writes a snapshot with a synced write: it must survive a crash before the log it replaces
/// is purged.
pub(crate) fn save_snapshot(
    storage: &Storage,
    group: GroupId,
    snapshot: &StoredSnapshot,
) -> io::Result<()> {
    let bytes = encode(snapshot).map_err(io_err)?;
    let mut batch = WriteBatch::default();
    batch.put_cf(
        storage.cf(CF_SNAPSHOT),
        keys::group_key(group, SNAPSHOT_TAG),
        bytes,
    );
    storage.write_durably(batch).map_err(io_err)
}

/// Stores a freshly built snapshot and hands it to openraft.
pub(crate) fn persist_snapshot(
    storage: &Storage,
    group: GroupId,
    meta: SnapshotMetaOf<TypeConfig>,
    data: Vec<u8>,
) -> io::Result<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>> {
    let stored = StoredSnapshot { meta, data };
    save_snapshot(storage, group, &stored)?;
    Ok(SnapshotOf::<TypeConfig, Cursor<Vec<u8>>> {
        meta: stored.meta,
        snapshot: Cursor::new(stored.data),
    })
}

/// The group's current snapshot, as openraft asks for it.
pub(crate) fn current_snapshot(
    storage: &Storage,
    group: GroupId,
) -> io::Result<Option<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>>> {
    Ok(
        load_snapshot(storage, group)?.map(|s| SnapshotOf::<TypeConfig, _> {
            meta: s.meta,
            snapshot: Cursor::new(s.data),
        }),
    )
}

/// Deletes everything a group's state machine stored (bodies and snapshot).
pub(crate) fn destroy_state(storage: &Storage, group: GroupId) -> io::Result<()> {
    let from = keys::group_prefix(group);
    let to = keys::group_upper_bound(group)
        .map(|k| k.to_vec())
        .unwrap_or_else(|| vec![0xff; 9]);
    let mut batch = WriteBatch::default();
    for cf in [CF_SM, CF_SNAPSHOT] {
        batch.delete_range_cf(storage.cf(cf), from.to_vec(), to.clone());
    }
    storage.write(batch).map_err(io_err)
}

/// A queue snapshot's data: the index, plus the group's records of the `sm` column family
/// (bodies and paged-out index entries, as key suffixes after the group prefix and raw
/// values) when it travels to another replica. Stored snapshots keep `records` empty: they
/// are in the column family.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    state: QueueState,
    records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Adds the group's bodies and paged entries to a stored snapshot's data, for sending it.
/// They are read now, not as of the snapshot: a record written later belongs to a command
/// the receiver replays from the log anyway (which rewrites it), and one deleted since
/// belongs to a message that replay settles or pages in again from the log's copy.
pub(crate) fn with_bodies(storage: &Storage, group: GroupId, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut payload: SnapshotPayload = postcard::from_bytes(data).map_err(io_err)?;
    let prefix = keys::group_prefix(group);
    let records = storage.db().iterator_cf(
        storage.cf(CF_SM),
        rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
    );
    for record in records {
        let (key, value) = record.map_err(io_err)?;
        if !key.starts_with(&prefix) {
            break;
        }
        payload
            .records
            .push((key[keys::PREFIX_LEN..].to_vec(), value.to_vec()));
    }
    postcard::to_allocvec(&payload).map_err(io_err)
}

fn body_key(group: GroupId, msg: MsgId) -> Vec<u8> {
    keys::group_key(group, &msg.to_be_bytes())
}

/// Adds the write of a message body to `batch`.
fn put_body(
    batch: &mut WriteBatch,
    storage: &Storage,
    group: GroupId,
    msg: MsgId,
    content: &MessageContent,
) -> io::Result<()> {
    let bytes = encode(content).map_err(io_err)?;
    batch.put_cf(storage.cf(CF_SM), body_key(group, msg), bytes);
    Ok(())
}

/// Tag of paged-out index entries among a group's records; a body key (a message id) is
/// shorter, so the two never meet.
const PAGED_TAG: u8 = b'P';

/// The prefix of a priority level's paged entries.
fn paged_prefix(group: GroupId, priority: u8) -> Vec<u8> {
    keys::group_key(group, &[PAGED_TAG, priority])
}

/// A paged entry's key: the level prefix, then the message id (so a level reads in id order).
fn paged_key(group: GroupId, priority: u8, msg: MsgId) -> Vec<u8> {
    let mut key = paged_prefix(group, priority);
    key.extend_from_slice(&msg.to_be_bytes());
    key
}

/// The message id of a paged key of the level `prefix` names.
fn paged_id(prefix: &[u8], key: &[u8]) -> Option<MsgId> {
    let id: [u8; 8] = key.strip_prefix(prefix)?.try_into().ok()?;
    Some(MsgId::from_be_bytes(id))
}

/// How many paged entries one page-in brings back.
const PAGE_IN_CHUNK: usize = 2048;

/// The first entries of a level on disk (all at `from` or after), as the leader reads them
/// for a page-in. Reading starts at `from` and stops at the level's end, so the deletions of
/// entries taken back earlier are not walked over again.
fn read_paged(
    storage: &Storage,
    group: GroupId,
    priority: u8,
    from: MsgId,
) -> io::Result<Vec<(MsgId, PagedEntry)>> {
    let prefix = paged_prefix(group, priority);
    let mut entries = Vec::new();
    let mut read = rocksdb::ReadOptions::default();
    let mut end = prefix.clone();
    end.extend_from_slice(&[0xff; 9]);
    read.set_iterate_upper_bound(end);
    let start = paged_key(group, priority, from);
    let records = storage.db().iterator_cf_opt(
        storage.cf(CF_SM),
        read,
        rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
    );
    for record in records {
        let (key, value) = record.map_err(io_err)?;
        if !key.starts_with(&prefix) || entries.len() >= PAGE_IN_CHUNK {
            break;
        }
        if let Some(id) = paged_id(&prefix, &key) {
            entries.push((id, decode(&value).map_err(io_err)?));
        }
    }
    Ok(entries)
}

/// The body of a message whose enqueue no snapshot covers yet: the log still holds it, so it
/// need not be on disk.
struct UnwrittenBody {
    content: MessageContent,
    /// What it counts against the budgets.
    size: usize,
    /// Re-applied from the log at start-up: a run before may have written it to disk.
    maybe_stored: bool,
}

/// Most bytes of bodies one queue keeps unwritten; past it (or past the node's
/// [`Storage::unwritten_bodies_budget`]) a body is written when its enqueue applies, as it
/// would be with no snapshot coming. Bounds the memory of a queue with large bodies or a
/// large `raft.snapshot_every`.
const UNWRITTEN_MAX_BYTES: usize = 8 << 20;

/// A queue's unwritten bodies, counted against its own limit and the node's budget.
struct UnwrittenBodies {
    bodies: HashMap<MsgId, UnwrittenBody>,
    /// The sizes of `bodies`, taken from the node's budget.
    memory: MemoryShare,
}

impl UnwrittenBodies {
    fn new(budget: Arc<MemoryBudget>) -> Self {
        UnwrittenBodies {
            bodies: HashMap::new(),
            memory: MemoryShare::new(budget),
        }
    }

    /// Keeps `content` in memory if both limits allow; hands it back if not.
    fn keep(
        &mut self,
        msg: MsgId,
        content: MessageContent,
        maybe_stored: bool,
    ) -> Option<MessageContent> {
        // Bodies share their buffers with the log entry; count them with a little overhead.
        let size = content.body.len() + content.properties.len() + 64;
        if self.memory.bytes() + size > UNWRITTEN_MAX_BYTES || !self.memory.try_take(size) {
            return Some(content);
        }
        let body = UnwrittenBody {
            content,
            size,
            maybe_stored,
        };
        if let Some(old) = self.bodies.insert(msg, body) {
            self.memory.give_back(old.size);
        }
        None
    }

    fn get(&self, msg: MsgId) -> Option<&UnwrittenBody> {
        self.bodies.get(&msg)
    }

    fn remove(&mut self, msg: MsgId) -> Option<UnwrittenBody> {
        let body = self.bodies.remove(&msg)?;
        self.memory.give_back(body.size);
        Some(body)
    }

    fn clear(&mut self) {
        self.bodies.clear();
        self.memory.give_back_all();
    }
}

/// Bodies as seen during one apply call: new bodies go to the machine's unwritten bodies,
/// disk writes and deletions are staged in a batch.
struct StagedBodies<'a> {
    storage: &'a Storage,
    group: GroupId,
    batch: WriteBatch,
    unwritten: &'a mut UnwrittenBodies,
    /// Paged entries written (true) or deleted (false) by this batch.
    paged: BTreeMap<(u8, MsgId), bool>,
    error: Option<io::Error>,
}

impl StagedBodies<'_> {
    /// Carries out a paging effect (every replica, replay included); other effects come back.
    fn page(&mut self, effect: Effect) -> Option<Effect> {
        match effect {
            Effect::PageOut {
                priority,
                msg,
                entry,
            } => match encode(&entry) {
                Ok(bytes) => {
                    let key = paged_key(self.group, priority, msg);
                    self.batch.put_cf(self.storage.cf(CF_SM), key, bytes);
                    self.paged.insert((priority, msg), true);
                }
                Err(e) => self.error = Some(io_err(e)),
            },
            Effect::Unpage { priority, msgs } => {
                for msg in msgs {
                    let key = paged_key(self.group, priority, msg);
                    self.batch.delete_cf(self.storage.cf(CF_SM), key);
                    self.paged.insert((priority, msg), false);
                }
            }
            Effect::DropPaged { priority } => self.drop_paged(priority),
            other => return Some(other),
        }
        None
    }

    /// A purge: every entry of the level on disk or written by this batch goes, with its
    /// body; entries this batch paged in already are in memory again and stay out of it.
    fn drop_paged(&mut self, priority: u8) {
        let prefix = paged_prefix(self.group, priority);
        let mut dropped: Vec<MsgId> = self
            .paged
            .range((priority, 0)..=(priority, MsgId::MAX))
            .filter(|(_, written)| **written)
            .map(|((_, id), _)| *id)
            .collect();
        let records = self.storage.db().iterator_cf(
            self.storage.cf(CF_SM),
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        );
        for record in records {
            let key = match record {
                Ok((key, _)) => key,
                Err(e) => {
                    self.error = Some(io_err(e));
                    return;
                }
            };
            if !key.starts_with(&prefix) {
                break;
            }
            if let Some(id) = paged_id(&prefix, &key)
                && !self.paged.contains_key(&(priority, id))
            {
                dropped.push(id);
            }
        }
        for id in &dropped {
            let key = paged_key(self.group, priority, *id);
            self.batch.delete_cf(self.storage.cf(CF_SM), key);
            self.paged.insert((priority, *id), false);
        }
        self.release(&dropped);
    }

    /// A body enqueued by the entry being applied; `replaying` if that entry was in the log
    /// when the node started.
    fn put(&mut self, msg: MsgId, content: MessageContent, replaying: bool) {
        let maybe_stored = replaying || self.unwritten.get(msg).is_some_and(|b| b.maybe_stored);
        if let Some(content) = self.unwritten.keep(msg, content, maybe_stored) {
            self.unwritten.remove(msg);
            if let Err(e) = put_body(&mut self.batch, self.storage, self.group, msg, &content) {
                self.error = Some(e);
            }
        }
    }
}

impl Bodies for StagedBodies<'_> {
    fn get(&mut self, msg: MsgId) -> Option<MessageContent> {
        if let Some(b) = self.unwritten.get(msg) {
            return Some(b.content.clone());
        }
        let bytes = self
            .storage
            .db()
            .get_cf(self.storage.cf(CF_SM), body_key(self.group, msg))
            .ok()??;
        decode(&bytes).ok()
    }

    fn release(&mut self, msgs: &[MsgId]) {
        for msg in msgs {
            let on_disk = self.unwritten.remove(*msg).is_none_or(|b| b.maybe_stored);
            if on_disk {
                self.batch
                    .delete_cf(self.storage.cf(CF_SM), body_key(self.group, *msg));
            }
        }
    }
}

pub struct QueueMachine {
    group: GroupId,
    storage: Storage,
    state: QueueState,
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    handle: Weak<QueueHandle>,
    /// Entries up to this index were in the log when the node started: applying them again
    /// rebuilds the state but must not deliver anything. Those deliveries went out (or were
    /// lost) in the previous run; the leader-recovery command resends what is still out.
    replay_until: u64,
    /// Bodies of live messages enqueued since the last snapshot was started (see the module
    /// comment).
    unwritten: UnwrittenBodies,
    /// Snapshots come every this many commands (`raft.snapshot_every`). openraft counts log
    /// entries, and one entry may carry a batch of commands; the log, the bodies kept in
    /// memory and the replay after a restart all grow with commands, so this machine asks
    /// for a snapshot when enough commands were applied.
    snapshot_every: u64,
    commands_since_snapshot: u64,
    /// The count at which to ask (again: a request made while a snapshot is being built is
    /// dropped) for the next snapshot.
    ask_for_snapshot_at: u64,
    held_back: HeldBack,
}

/// Deliveries this node, as the new leader of a term, decided before its recovery command
/// applied and so did not send (`QueueHandle::set_recovered_term`). The recovery command
/// sends them with the old leader's leftovers, and these are first deliveries, not repeats:
/// nothing sent them before.
#[derive(Default)]
struct HeldBack {
    term: u64,
    msgs: HashSet<MsgId>,
}

impl HeldBack {
    fn hold(&mut self, term: u64, msg: MsgId) {
        if self.term != term {
            self.term = term;
            self.msgs.clear();
        }
        self.msgs.insert(msg);
    }

    /// Takes the messages held back in `term`.
    fn take(&mut self, term: u64) -> HashSet<MsgId> {
        let msgs = std::mem::take(&mut self.msgs);
        if self.term == term {
            msgs
        } else {
            HashSet::new()
        }
    }
}

impl QueueMachine {
    /// Opens the state machine of `group`, restoring its last snapshot if it has one.
    /// `replay_until` is the last log index present when the node started.
    pub fn open(
        storage: Storage,
        group: GroupId,
        handle: &Arc<QueueHandle>,
        replay_until: u64,
        page_window: u32,
        snapshot_every: u64,
    ) -> io::Result<Self> {
        let mut machine = QueueMachine {
            snapshot_every,
            commands_since_snapshot: 0,
            ask_for_snapshot_at: snapshot_every,
            held_back: HeldBack::default(),
            unwritten: UnwrittenBodies::new(storage.unwritten_bodies_budget().clone()),
            group,
            storage,
            state: QueueState::with_config(handle.config()).with_page_window(page_window),
            last_applied: None,
            membership: StoredMembership::default(),
            handle: Arc::downgrade(handle),
            replay_until,
        };
        if let Some(snap) = load_snapshot(&machine.storage, group)? {
            let payload: SnapshotPayload = postcard::from_bytes(&snap.data).map_err(io_err)?;
            machine.state = payload.state;
            machine.last_applied = snap.meta.last_log_id;
            machine.membership = snap.meta.last_membership;
        }
        handle.set_stats(machine.state.stats());
        handle.set_pending_txs(machine.state.pending_txs());
        Ok(machine)
    }

    /// Writes every unwritten body to the `sm` column family (not synced) and forgets them.
    /// On failure they stay unwritten: the log still holds them.
    fn write_unwritten_bodies(&mut self) -> io::Result<()> {
        if self.unwritten.bodies.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for (msg, body) in &self.unwritten.bodies {
            put_body(&mut batch, &self.storage, self.group, *msg, &body.content)?;
        }
        self.storage.write(batch).map_err(io_err)?;
        self.unwritten.clear();
        Ok(())
    }
}

pub struct QueueSnapshotBuilder {
    group: GroupId,
    storage: Storage,
    state: QueueState,
    last_applied: Option<LogIdOf<TypeConfig>>,
    membership: StoredMembershipOf<TypeConfig>,
    /// Writing the live bodies for this snapshot failed: it must not be saved.
    bodies_not_written: Option<io::Error>,
}

impl RaftSnapshotBuilder<TypeConfig> for QueueSnapshotBuilder {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> io::Result<SnapshotOf<TypeConfig, Cursor<Vec<u8>>>> {
        if let Some(e) = self.bodies_not_written.take() {
            return Err(e);
        }
        let data = postcard::to_allocvec(&SnapshotPayload {
            state: std::mem::take(&mut self.state),
            records: Vec::new(),
        })
        .map_err(io_err)?;
        let meta = SnapshotMetaOf::<TypeConfig> {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
        };
        persist_snapshot(&self.storage, self.group, meta, data)
    }
}

/// Page-ins the state asks for while a run of entries is applied, by priority: (the index
/// entry's sequence number, the message to read from). Answered once the run is on disk.
type PageIns = BTreeMap<u8, (u64, MsgId)>;

/// What applying one queue command needs from the entry that carries it and the run of
/// entries being applied; a batch entry applies each of its commands with the same.
struct Applying<'a, 'b> {
    state: &'a mut QueueState,
    log_id: &'a LogIdOf<TypeConfig>,
    replaying: bool,
    handle: Option<&'a Arc<QueueHandle>>,
    bodies: &'a mut StagedBodies<'b>,
    page_ins: &'a mut PageIns,
    held_back: &'a mut HeldBack,
}

impl Applying<'_, '_> {
    fn request(&mut self, req: QueueRequest) -> GroupResponse {
        if req.origin.is_some_and(|o| !self.state.in_order(o)) {
            return GroupResponse::OutOfOrder;
        }
        let recovery = matches!(req.cmd, QueueCmd::LeaderRecovery { .. });
        let (reply, effects) = self.state.apply(req.cmd, req.at_ms);
        let replaying = self.replaying;
        if let (
            QueueReply::Enqueued { msg }
            | QueueReply::Rejected { msg: Some(msg) }
            | QueueReply::Staged { msg: Some(msg) },
            Some(content),
        ) = (&reply, req.content)
        {
            self.bodies.put(*msg, content, replaying);
        }
        let content = match &reply {
            QueueReply::GetOk { msg, .. } => self.bodies.get(*msg),
            _ => None,
        };
        let mut effects: Vec<Effect> = effects
            .into_iter()
            .filter_map(|e| self.bodies.page(e))
            .collect();
        match self.handle {
            Some(h) if !replaying => {
                // Only entries this node wrote as the current leader.
                let term = self.log_id.leader_id.term;
                let own = self.log_id.leader_id.node_id == h.node_id() && term == h.leader_term();
                let serving = h.is_leader() && own;
                if serving && recovery {
                    h.set_recovered_term(term);
                    let first_sends = self.held_back.take(term);
                    for e in &mut effects {
                        if let Effect::Deliver { msg, resend, .. } = e
                            && first_sends.contains(msg)
                        {
                            *resend = false;
                        }
                    }
                }
                let recovered = h.recovered_term() == term;
                let page_ins = &mut *self.page_ins;
                let held_back = &mut *self.held_back;
                effects.retain(|e| match e {
                    // Stays checked out; the recovery command sends it (`set_recovered_term`).
                    Effect::Deliver {
                        no_ack: false, msg, ..
                    } if serving && !recovered => {
                        held_back.hold(term, *msg);
                        false
                    }
                    Effect::WantPageIn {
                        priority,
                        seq,
                        from,
                    } => {
                        if serving {
                            page_ins.insert(*priority, (*seq, *from));
                        }
                        false
                    }
                    _ => true,
                });
                h.run_effects_as(serving, effects, self.bodies)
            }
            _ => {
                for e in effects {
                    if let warren_core::queue::Effect::Release { msgs } = e {
                        self.bodies.release(&msgs);
                    }
                }
            }
        }
        GroupResponse::Queue(QueueOutcome { reply, content })
    }
}

impl RaftStateMachine<TypeConfig> for QueueMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = QueueSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> io::Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>)> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> io::Result<()>
    where
        Strm: futures::Stream<Item = io::Result<EntryResponder<TypeConfig>>> + Unpin + OptionalSend,
    {
        let handle = self.handle.upgrade();
        let mut bodies = StagedBodies {
            storage: &self.storage,
            group: self.group,
            batch: WriteBatch::default(),
            unwritten: &mut self.unwritten,
            paged: BTreeMap::new(),
            error: None,
        };
        let mut responses = Vec::new();
        // Page-ins the state asks for, answered once this batch is on disk (leader only).
        let mut page_ins = PageIns::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            self.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => GroupResponse::Empty,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    GroupResponse::Empty
                }
                EntryPayload::Normal(request) => {
                    let mut apply = Applying {
                        state: &mut self.state,
                        log_id: &entry.log_id,
                        replaying: entry.log_id.index <= self.replay_until,
                        handle: handle.as_ref(),
                        bodies: &mut bodies,
                        page_ins: &mut page_ins,
                        held_back: &mut self.held_back,
                    };
                    match request {
                        GroupRequest::Queue(req) => {
                            self.commands_since_snapshot += 1;
                            apply.request(req)
                        }
                        GroupRequest::QueueBatch(reqs) => {
                            self.commands_since_snapshot += reqs.len() as u64;
                            GroupResponse::QueueBatch(
                                reqs.into_iter().map(|r| apply.request(r)).collect(),
                            )
                        }
                        GroupRequest::Meta(_) => GroupResponse::Empty,
                    }
                }
            };
            if let Some(r) = responder {
                responses.push((r, response));
            }
        }
        if let Some(e) = bodies.error.take() {
            return Err(e);
        }
        let batch = std::mem::take(&mut bodies.batch);
        drop(bodies);
        if !batch.is_empty() {
            self.storage.write(batch).map_err(io_err)?;
        }
        if self.commands_since_snapshot >= self.ask_for_snapshot_at {
            self.ask_for_snapshot_at = self.commands_since_snapshot + self.snapshot_every;
            if let Some(raft) = handle.as_ref().and_then(|h| h.raft()) {
                // Not awaited here: the request goes through the Raft core, which may be
                // waiting for this very apply.
                tokio::spawn(async move {
                    let _ = raft.trigger().snapshot().await;
                });
            }
        }
        if let Some(h) = &handle {
            h.set_stats(self.state.stats());
            h.set_pending_txs(self.state.pending_txs());
            for (priority, (seq, from)) in page_ins {
                if h.should_page_in(priority, seq) {
                    let entries = read_paged(&self.storage, self.group, priority, from)?;
                    h.submit(
                        QueueRequest::new(QueueCmd::PageIn {
                            priority,
                            seq,
                            entries,
                        }),
                        ReplyTo::None,
                    );
                }
            }
        }
        for (responder, response) in responses {
            responder.send(response);
        }
        Ok(())
    }

    /// Runs between two applies: the snapshot covers everything applied so far, so the bodies
    /// of the messages live now are written here, in order with the applies' deletions. The
    /// builder saves the snapshot later with a synced write, which makes them durable first;
    /// until it does, the log keeps every entry after the previous snapshot.
    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.commands_since_snapshot = 0;
        self.ask_for_snapshot_at = self.snapshot_every;
        let bodies_not_written = self.write_unwritten_bodies().err();
        QueueSnapshotBuilder {
            group: self.group,
            storage: self.storage.clone(),
            state: self.state.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            bodies_not_written,
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: Self::SnapshotData,
    ) -> io::Result<()> {
        let payload: SnapshotPayload =
            postcard::from_bytes(&snapshot.into_inner()).map_err(io_err)?;
        // The snapshot replaces everything: old bodies go, the snapshot's bodies come in, and
        // the stored copy keeps only the index.
        let mut batch = WriteBatch::default();
        let from = keys::group_prefix(self.group).to_vec();
        let to = keys::group_upper_bound(self.group)
            .map(|k| k.to_vec())
            .unwrap_or_else(|| vec![0xff; 9]);
        batch.delete_range_cf(self.storage.cf(CF_SM), from, to);
        for (suffix, value) in &payload.records {
            batch.put_cf(
                self.storage.cf(CF_SM),
                keys::group_key(self.group, suffix),
                value,
            );
        }
        self.storage.write(batch).map_err(io_err)?;
        let state = payload.state;
        let data = postcard::to_allocvec(&SnapshotPayload {
            state: state.clone(),
            records: Vec::new(),
        })
        .map_err(io_err)?;
        save_snapshot(
            &self.storage,
            self.group,
            &StoredSnapshot {
                meta: meta.clone(),
                data,
            },
        )?;
        self.state = state;
        // Every live body of the new state is in the snapshot's records, now on disk.
        self.unwritten.clear();
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        if let Some(h) = self.handle.upgrade() {
            h.set_stats(self.state.stats());
            h.set_pending_txs(self.state.pending_txs());
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> io::Result<Option<SnapshotOf<TypeConfig, Self::SnapshotData>>> {
        current_snapshot(&self.storage, self.group)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use warren_core::MessageContent;

    use super::{UNWRITTEN_MAX_BYTES, UnwrittenBodies};
    use crate::db::MemoryBudget;

    fn content(len: usize) -> MessageContent {
        MessageContent {
            exchange: warren_codec::ShortStr::default(),
            routing_key: warren_codec::ShortStr::try_from("q").unwrap(),
            properties: Bytes::new(),
            body: Bytes::from(vec![b'x'; len]),
        }
    }

    /// Bodies stay unwritten only within the queue's limit and the node's budget; what they
    /// took goes back when they are settled, cleared or dropped.
    #[test]
    fn unwritten_bodies_stay_within_the_queue_limit_and_the_node_budget() {
        let budget = Arc::new(MemoryBudget::new(10_000));
        let mut bodies = UnwrittenBodies::new(budget.clone());
        assert!(bodies.keep(1, content(4_000), false).is_none());
        assert!(bodies.keep(2, content(4_000), true).is_none());
        assert!(
            bodies.keep(3, content(4_000), false).is_some(),
            "node budget"
        );
        assert!(bodies.get(2).is_some_and(|b| b.maybe_stored));
        assert!(bodies.remove(1).is_some());
        assert_eq!(budget.used(), 4_064);
        // Keeping a message again replaces its earlier copy instead of counting it twice.
        assert!(bodies.keep(2, content(100), true).is_none());
        assert_eq!(budget.used(), 164);
        bodies.clear();
        assert_eq!(budget.used(), 0);

        let big = Arc::new(MemoryBudget::new(usize::MAX));
        let mut queue = UnwrittenBodies::new(big.clone());
        assert!(
            queue.keep(1, content(UNWRITTEN_MAX_BYTES), false).is_some(),
            "queue limit"
        );
        assert!(queue.keep(1, content(1_000), false).is_none());
        drop(queue);
        assert_eq!(big.used(), 0);
    }

    /// Deliveries a sink received: (message body, resend flag), in order.
    #[derive(Default)]
    struct Received(std::sync::Mutex<Vec<(String, bool)>>);

    impl crate::queue::DeliverySink for Received {
        fn deliver(&self, d: crate::queue::Delivery) {
            let body = String::from_utf8_lossy(&d.content.body).into_owned();
            self.0.lock().unwrap().push((body, d.resend));
        }

        fn consumer_gone(&self, _: &warren_core::ConsumerKey) {}
    }

    /// One queue command as the only command of the entry at `index`, written by `leader` in
    /// `term`.
    fn entry(
        term: u64,
        leader: u64,
        index: u64,
        request: crate::types::QueueRequest,
    ) -> openraft::alias::EntryOf<crate::types::TypeConfig> {
        openraft::Entry {
            log_id: openraft::testing::log_id::<crate::types::TypeConfig>(term, leader, index),
            payload: openraft::EntryPayload::Normal(crate::types::GroupRequest::Queue(request)),
        }
    }

    fn enqueue(body: &str) -> crate::types::QueueRequest {
        crate::types::QueueRequest::with_content(
            warren_core::queue::QueueCmd::Enqueue {
                meta: warren_core::queue::MessageMeta {
                    size: body.len() as u64,
                    ..Default::default()
                },
                publisher: None,
            },
            MessageContent {
                exchange: warren_codec::ShortStr::default(),
                routing_key: warren_codec::ShortStr::try_from("q").unwrap(),
                properties: Bytes::new(),
                body: Bytes::from(body.to_owned()),
            },
        )
    }

    /// A new leader's own entries may decide deliveries before its recovery command applies.
    /// Sent at once, they would overtake what the old leader decided and maybe never sent,
    /// which only the recovery sends (again); so they wait for the recovery and go out with
    /// it, in queue order, as first deliveries (not flagged as resends).
    #[tokio::test]
    async fn a_new_leaders_deliveries_wait_for_its_recovery_and_keep_queue_order() {
        use openraft::storage::RaftStateMachine;
        use warren_core::queue::QueueCmd;
        use warren_core::{ChannelRef, ConnectionRef, ConsumerKey, NodeRun};

        const GROUP: u64 = 7;
        let dir = tempfile::tempdir().unwrap();
        let storage =
            crate::db::Storage::open(dir.path(), &crate::db::StorageOptions::small()).unwrap();
        let net = crate::mem_net::MemNet::new();
        let outbox = crate::outbox::Outbox::new(1, net.transport(1));
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let def = warren_core::meta::QueueDef {
            id: GROUP,
            name: "q".into(),
            durable: true,
            exclusive_owner: None,
            auto_delete: false,
            arguments: Default::default(),
            placement: warren_core::meta::Placement::Replicated {
                group: GROUP,
                replicas: vec![1, 2],
            },
        };
        let handle = crate::queue::QueueHandle::new(
            1,
            "/".into(),
            def,
            crate::queue::Backend::Proposer { tx },
            None,
            outbox,
        );
        let consumer = ConsumerKey {
            channel: ChannelRef {
                conn: ConnectionRef {
                    run: NodeRun {
                        node: 1,
                        incarnation: 1,
                    },
                    conn: 1,
                },
                channel: 1,
                opened: 1,
            },
            tag: "c".into(),
        };
        let received = Arc::new(Received::default());
        handle.attach(consumer.clone(), received.clone());
        let mut machine =
            super::QueueMachine::open(storage, GROUP, &handle, 0, 8192, u64::MAX).unwrap();
        let mut apply = async |entries: Vec<openraft::alias::EntryOf<crate::types::TypeConfig>>| {
            let stream = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
            machine.apply(stream).await.unwrap();
        };

        // Term 1, led by node 2: the consumer takes m1 and m2 (node 2 sends them, or not).
        let consume = QueueCmd::Consume {
            consumer: consumer.clone(),
            prefetch: 10,
            no_ack: false,
            exclusive: false,
            priority: 0,
        };
        apply(vec![
            entry(1, 2, 1, crate::types::QueueRequest::new(consume)),
            entry(1, 2, 2, enqueue("m1")),
            entry(1, 2, 3, enqueue("m2")),
        ])
        .await;
        assert!(received.0.lock().unwrap().is_empty(), "node 2's to send");

        // Term 2, led by this node: m3 is decided for the consumer before the recovery.
        handle.set_leader_term(2);
        handle.set_leader(true);
        apply(vec![entry(2, 1, 4, enqueue("m3"))]).await;
        assert!(
            received.0.lock().unwrap().is_empty(),
            "sent before the recovery: {:?}",
            received.0.lock().unwrap()
        );

        let recovery = QueueCmd::LeaderRecovery { down: Vec::new() };
        apply(vec![entry(
            2,
            1,
            5,
            crate::types::QueueRequest::new(recovery),
        )])
        .await;
        let expected = |body: &str, resend| (body.to_owned(), resend);
        assert_eq!(
            *received.0.lock().unwrap(),
            vec![
                expected("m1", true),
                expected("m2", true),
                expected("m3", false)
            ]
        );

        // After the recovery, deliveries go out as they are decided.
        apply(vec![entry(2, 1, 6, enqueue("m4"))]).await;
        assert_eq!(
            received.0.lock().unwrap().last(),
            Some(&expected("m4", false))
        );
    }
}
