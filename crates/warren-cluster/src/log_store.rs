//! The Raft log of one group, kept in the node's shared RocksDB: openraft's `RaftLogStorage`
//! and `RaftLogReader`.
//!
//! Neighbours: [`crate::db`] opens the database and defines the key layout and value encoding;
//! [`crate::flusher`] makes appends durable in groups. Each `Raft` group gets its store from
//! [`crate::db::Storage::log_store`]; the state machine lives elsewhere and only shares the DB.
//!
//! Layout: entries in `CF_LOG` under `group ++ index`; in `CF_META` under `group ++ tag` the
//! vote, the committed log id and the last purged log id.
//!
//! Durability: `append` writes its batch through [`Storage::write`] (to the memtables and the
//! node's [`crate::journal`]) without sync, so the entries are readable as soon as it returns,
//! and hands its `IOFlushed` callback to the flusher, which fires it after the next journal
//! fsync. `save_vote` does the same but waits for that fsync before returning, as openraft
//! requires. `truncate_after`, `purge` and `save_committed` do not wait: every write of the node
//! goes through one journal, replayed as a prefix, so each of them is durable no later
//! than the next append or vote that follows it, and losing one in a crash only rolls this group
//! back to an earlier consistent state (entries not yet truncated or purged, an older committed
//! id — which openraft tolerates since committed entries are durable on a quorum).
//!
//! RocksDB calls here block the calling task briefly (memtable writes and reads); only fsyncs
//! are moved off the async runtime.
//!
//! Recent entries: every entry is read back right after it is appended — by the replication
//! streams on a leader and by the state machine on every replica — so a store keeps the
//! entries it appended, decoded, until the state machine has read them ([`RecentEntries`]).
//! Reading them from RocksDB instead meant an iterator, a copy and a decode of every body once
//! per follower plus once for the apply (6 % of a 3-node cluster's CPU under publish load).
//! The cache is an exact copy of the end of the log or empty: it changes only after the
//! RocksDB write it mirrors, and a read it cannot serve whole goes to RocksDB.

use std::collections::VecDeque;
use std::fmt;
use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::PoisonError;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::RaftTypeConfig;
use openraft::alias::LogIdOf;
use openraft::alias::VoteOf;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use rocksdb::ColumnFamily;
use rocksdb::DB;
use rocksdb::Direction;
use rocksdb::IteratorMode;
use rocksdb::ReadOptions;
use rocksdb::WriteBatch;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::db::CF_LOG;
use crate::db::CF_META;
use crate::db::DbError;
use crate::db::GroupId;
use crate::db::MemoryBudget;
use crate::db::MemoryShare;
use crate::db::Storage;
use crate::db::decode;
use crate::db::encode;
use crate::db::keys;

/// How much entry data (encoded bytes) `limited_get_log_entries` returns at most, beyond the
/// first entry: keeps one replication message well below common RPC size limits.
pub const LIMITED_READ_BYTES: usize = 1 << 20;

/// Most entries and encoded bytes a group keeps in [`RecentEntries`]. Entries leave the cache
/// once the state machine has read them, so under load it holds about the batches in flight;
/// the limits bound what an idle group keeps (a follower applies its last batch only when the
/// next one arrives) and what a stalled state machine could pile up. All groups of a node
/// share [`Storage::recent_entries_budget`] besides.
const RECENT_MAX_ENTRIES: usize = 2048;
const RECENT_MAX_BYTES: usize = 2 << 20;

/// The last entries of a group's log, decoded, with their encoded sizes: consecutive indexes
/// ending at the last entry of the log, or empty. Older entries are dropped first, so whatever
/// is left is still the end of the log.
struct RecentEntries<E> {
    entries: VecDeque<(E, usize)>,
    /// The encoded sizes of `entries`, taken from the node's budget.
    memory: MemoryShare,
}

impl<E: RaftEntry + Clone> RecentEntries<E> {
    fn new(budget: Arc<MemoryBudget>) -> Self {
        RecentEntries {
            entries: VecDeque::new(),
            memory: MemoryShare::new(budget),
        }
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.index())
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(e, _)| e.index())
    }

    /// Records entries just written after the current last one. A batch that does not
    /// continue the cached run (the cache was empty or trimmed, or the log moved without it)
    /// replaces it.
    fn appended(&mut self, batch: Vec<(E, usize)>) {
        let continues = match (self.last_index(), batch.first()) {
            (Some(last), Some((first, _))) => last.checked_add(1) == Some(first.index()),
            _ => true,
        };
        if !continues {
            self.clear();
        }
        for (entry, size) in batch {
            if !self.memory.try_take(size) {
                // The node's budget is spent: keep nothing rather than a run with a gap.
                self.clear();
                return;
            }
            self.entries.push_back((entry, size));
        }
        while self.entries.len() > RECENT_MAX_ENTRIES || self.memory.bytes() > RECENT_MAX_BYTES {
            self.pop_front();
        }
    }

    /// Drops every entry after `last` (`None`: all of them), as a truncation of the log does.
    fn truncated_after(&mut self, last: Option<u64>) {
        while let Some(index) = self.last_index() {
            if last.is_some_and(|last| index <= last) {
                break;
            }
            let (_, size) = self.entries.pop_back().expect("a last entry exists");
            self.memory.give_back(size);
        }
    }

    /// Drops every entry up to and including `upto`.
    fn drop_upto(&mut self, upto: u64) {
        while self.first_index().is_some_and(|first| first <= upto) {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.memory.give_back(size);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.memory.give_back_all();
    }

    /// Entries `start <= index < end` as `read_entries` returns them, or `None` if the cache
    /// does not hold the whole range. `end == None` reads to the end of the log, which is the
    /// last cached entry.
    fn read(&self, start: u64, end: Option<u64>, max_bytes: Option<usize>) -> Option<Vec<E>> {
        let (first, last) = (self.first_index()?, self.last_index()?);
        let end = end.unwrap_or(last.saturating_add(1));
        if start < first || start > last || end > last.saturating_add(1) {
            return None;
        }
        let skip = usize::try_from(start - first).ok()?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (entry, size) in self.entries.iter().skip(skip) {
            if entry.index() >= end {
                break;
            }
            out.push(entry.clone());
            bytes += size;
            if max_bytes.is_some_and(|max| bytes >= max) {
                break;
            }
        }
        Some(out)
    }
}

/// The Raft log of one group. Cheap to clone; clones share everything, and a clone serves as
/// the group's log reader.
pub struct LogStore<C: RaftTypeConfig> {
    storage: Storage,
    group: GroupId,
    recent: Arc<Mutex<RecentEntries<C::Entry>>>,
    _config: PhantomData<fn() -> C>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore {
            storage: self.storage.clone(),
            group: self.group,
            recent: self.recent.clone(),
            _config: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> fmt::Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl<C: RaftTypeConfig> LogStore<C>
where
    C::Entry: Clone,
{
    pub(crate) fn new(storage: Storage, group: GroupId) -> Self {
        let budget = storage.recent_entries_budget().clone();
        LogStore {
            storage,
            group,
            recent: Arc::new(Mutex::new(RecentEntries::new(budget))),
            _config: PhantomData,
        }
    }

    /// The recent entries, also after a panic elsewhere while they were held: every change to
    /// them is a single step that leaves them consistent.
    fn recent(&self) -> std::sync::MutexGuard<'_, RecentEntries<C::Entry>> {
        self.recent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The group whose log this is.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The node storage this log lives in.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Removes this group's whole log and Raft metadata (vote, committed, purge point), for a
    /// deleted queue. Not synced: durable with the next fsync of the node.
    pub fn destroy(&self) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            self.cf(CF_LOG),
            keys::log_key(self.group, 0).to_vec(),
            keys::log_key_bound(self.group, None),
        );
        for tag in [keys::TAG_VOTE, keys::TAG_COMMITTED, keys::TAG_LAST_PURGED] {
            batch.delete_cf(self.cf(CF_META), keys::group_key(self.group, tag));
        }
        self.write_mirrored(batch, RecentEntries::clear)
    }

    fn db(&self) -> &DB {
        self.storage.db()
    }

    fn cf(&self, name: &str) -> &ColumnFamily {
        self.storage.cf(name)
    }

    /// Every write of the store goes through here. Refused once the storage is closed: nothing
    /// should be written that the flusher could no longer make durable.
    fn write(&self, batch: WriteBatch) -> io::Result<()> {
        // Not synced: the flusher's fsync makes it durable (see the module comment).
        self.storage.write(batch).map_err(io::Error::from)
    }

    /// Writes a change to the log and makes the same change to the recent entries; if the
    /// write fails, RocksDB may or may not hold it, so the cache is emptied.
    fn write_mirrored(
        &self,
        batch: WriteBatch,
        mirror: impl FnOnce(&mut RecentEntries<C::Entry>),
    ) -> io::Result<()> {
        let written = self.write(batch);
        let mut recent = self.recent();
        match &written {
            Ok(()) => mirror(&mut recent),
            Err(_) => recent.clear(),
        }
        written
    }

    fn get_meta<T: DeserializeOwned>(&self, tag: &[u8]) -> io::Result<Option<T>> {
        let key = keys::group_key(self.group, tag);
        match self
            .db()
            .get_pinned_cf(self.cf(CF_META), key)
            .map_err(DbError::from)?
        {
            Some(bytes) => Ok(Some(decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, tag: &[u8], value: &T) -> io::Result<()> {
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(CF_META),
            keys::group_key(self.group, tag),
            encode(value)?,
        );
        self.write(batch)
    }

    /// Entries with `start <= index < end` (`end == None`: no upper limit), in order. Stops after
    /// the entry that brings the total encoded size to `max_bytes`, if given.
    fn read_entries(
        &self,
        start: u64,
        end: Option<u64>,
        max_bytes: Option<usize>,
    ) -> io::Result<Vec<C::Entry>> {
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        if let Some(entries) = self.recent().read(start, end, max_bytes) {
            return Ok(entries);
        }
        self.read_stored(start, end, max_bytes)
    }

    /// `read_entries` from RocksDB alone.
    fn read_stored(
        &self,
        start: u64,
        end: Option<u64>,
        max_bytes: Option<usize>,
    ) -> io::Result<Vec<C::Entry>> {
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(keys::log_key_bound(self.group, end));
        let first = keys::log_key(self.group, start);
        // An iterator reads from an implicit snapshot: the result is one consistent state even
        // if appends or truncations run concurrently.
        let iter = self.db().iterator_cf_opt(
            self.cf(CF_LOG),
            opts,
            IteratorMode::From(&first, Direction::Forward),
        );

        let mut entries = Vec::new();
        let mut bytes = 0usize;
        let mut expected = None;
        for item in iter {
            let (key, value) = item.map_err(DbError::from)?;
            let index = keys::log_index(&key).ok_or_else(|| {
                invalid_data(format!("malformed log key {key:?} in group {}", self.group))
            })?;
            if let Some(expected) = expected
                && index != expected
            {
                return Err(invalid_data(format!(
                    "hole in the log of group {}: expected index {expected}, found {index}",
                    self.group
                )));
            }
            let entry: C::Entry = decode(&value)?;
            if entry.index() != index {
                return Err(invalid_data(format!(
                    "log entry {} of group {} stored under index {index}",
                    entry.log_id(),
                    self.group
                )));
            }
            entries.push(entry);
            expected = index.checked_add(1);
            bytes += value.len();
            if max_bytes.is_some_and(|max| bytes >= max) {
                break;
            }
        }
        Ok(entries)
    }

    /// The log id of the last present entry, if any.
    fn last_entry_log_id(&self) -> io::Result<Option<LogIdOf<C>>> {
        let mut iter = self.db().raw_iterator_cf(self.cf(CF_LOG));
        iter.seek_for_prev(keys::log_key(self.group, u64::MAX));
        if !iter.valid() {
            iter.status().map_err(DbError::from)?;
            return Ok(None);
        }
        let in_group = iter
            .key()
            .is_some_and(|k| k.starts_with(&keys::group_prefix(self.group)));
        if !in_group {
            return Ok(None);
        }
        let value = iter
            .value()
            .ok_or_else(|| invalid_data("log iterator has a key but no value".into()))?;
        let entry: C::Entry = decode(value)?;
        Ok(Some(entry.log_id()))
    }
}

fn invalid_data(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// `[start, end)` of a range of log indexes; `end == None` means unbounded.
fn index_range(range: &impl RangeBounds<u64>) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        // Nothing lies after u64::MAX: make the range empty.
        Bound::Excluded(&s) => match s.checked_add(1) {
            Some(s) => s,
            None => return (u64::MAX, Some(u64::MAX)),
        },
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    (start, end)
}

impl<C: RaftTypeConfig> RaftLogReader<C> for LogStore<C>
where
    C::Entry: Clone,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, io::Error> {
        let (start, end) = index_range(&range);
        let entries = self.read_entries(start, end, None)?;
        // The state machine reads what it applies from the front of what it has not applied
        // yet; once it has, only a lagging follower could want those entries again, and it can
        // read them from RocksDB. (Replication reads through `limited_get_log_entries`.)
        if let Some(last) = entries.last() {
            let mut recent = self.recent();
            if recent.first_index() == Some(start) {
                recent.drop_upto(last.index());
            }
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        self.get_meta(keys::TAG_VOTE)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, io::Error> {
        self.read_entries(start, Some(end), Some(LIMITED_READ_BYTES))
    }
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for LogStore<C>
where
    C::Entry: Clone,
{
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<C>> = self.get_meta(keys::TAG_LAST_PURGED)?;
        let last_log_id = match self.last_entry_log_id()? {
            Some(id) => Some(id),
            None => last_purged_log_id.clone(),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        self.put_meta(keys::TAG_VOTE, vote)?;
        // openraft needs the vote durable before we return; wait for the shared fsync rather
        // than syncing this write alone.
        self.storage.sync().await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        match committed {
            Some(id) => self.put_meta(keys::TAG_COMMITTED, &id),
            None => {
                let mut batch = WriteBatch::default();
                batch.delete_cf(
                    self.cf(CF_META),
                    keys::group_key(self.group, keys::TAG_COMMITTED),
                );
                self.write(batch)
            }
        }
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        self.get_meta(keys::TAG_COMMITTED)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Any failure is reported both ways: as the return value and through the callback.
        let written = (|| {
            let cf = self.cf(CF_LOG);
            let mut batch = WriteBatch::default();
            let mut appended = Vec::new();
            for entry in entries {
                let key = keys::log_key(self.group, entry.index());
                let value = encode(&entry)?;
                batch.put_cf(cf, key, &value);
                appended.push((entry, value.len()));
            }
            // Readable once this returns; durable once the flusher's next fsync is done. An
            // empty append still waits for that fsync: its callback vouches for what came before.
            self.write_mirrored(batch, |recent| recent.appended(appended))
        })();
        if let Err(e) = written {
            callback.io_completed(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
        self.storage
            .queue_completion(Box::new(move |result| callback.io_completed(result)))
            .map_err(io::Error::from)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = match last_log_id {
            Some(id) => match id.index().checked_add(1) {
                Some(from) => from,
                None => return Ok(()),
            },
            None => 0,
        };
        let mut batch = WriteBatch::default();
        // One range tombstone: atomic, so no hole can appear even if we crash mid-way.
        batch.delete_range_cf(
            self.cf(CF_LOG),
            keys::log_key(self.group, from).to_vec(),
            keys::log_key_bound(self.group, None),
        );
        self.write_mirrored(batch, |recent| recent.truncated_after(from.checked_sub(1)))
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let mut batch = WriteBatch::default();
        // The purge point and the deletion go in one batch, so after a crash either both or
        // neither are there and get_log_state stays right.
        batch.put_cf(
            self.cf(CF_META),
            keys::group_key(self.group, keys::TAG_LAST_PURGED),
            encode(&log_id)?,
        );
        batch.delete_range_cf(
            self.cf(CF_LOG),
            keys::log_key(self.group, 0).to_vec(),
            keys::log_key_bound(self.group, log_id.index().checked_add(1)),
        );
        let upto = log_id.index();
        self.write_mirrored(batch, |recent| recent.drop_upto(upto))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::storage::IOFlushed;
    use openraft::storage::RaftLogStorage;
    use openraft::type_config::TypeConfigExt;

    use openraft::RaftLogReader;
    use proptest::prelude::*;

    use super::index_range;
    use crate::db::Storage;
    use crate::db::StorageOptions;

    openraft::declare_raft_types!(UnitConfig: D = String, R = ());

    /// While the flusher is held back, appends from several groups queue up: none completes
    /// before an fsync, and then all of them complete after exactly one.
    #[tokio::test]
    async fn appends_from_many_groups_share_one_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), &StorageOptions::small()).unwrap();
        storage.flusher().set_paused(true);

        let mut receivers = Vec::new();
        for group in 0..4u64 {
            let mut store = storage.log_store::<UnitConfig>(group);
            for index in 1..=25u64 {
                let entry = openraft::testing::blank_ent::<UnitConfig>(1, 1, index);
                let (tx, rx) = UnitConfig::oneshot();
                store.append([entry], IOFlushed::signal(tx)).await.unwrap();
                receivers.push(rx);
            }
        }
        // Give a (wrongly) running flusher every chance to complete something.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(storage.flush_stats().fsyncs, 0);
        assert_eq!(storage.flush_stats().callbacks_completed, 0);
        for rx in &mut receivers {
            assert!(rx.try_recv().is_err(), "completed before any fsync");
        }

        storage.flusher().set_paused(false);
        for rx in receivers {
            rx.await.unwrap().unwrap();
        }
        let stats = storage.flush_stats();
        assert_eq!(stats.fsyncs, 1, "{stats:?}");
        assert_eq!(stats.callbacks_completed, 100);
        assert_eq!(stats.largest_batch, 100);
    }

    #[derive(Debug, Clone)]
    enum LogOp {
        Append(u8),
        TruncateAfter(u8),
        Purge(u8),
        /// What the state machine does: read from where it has applied to up to `n` entries on.
        Apply(u8),
        Read(u8, Option<u8>, Option<u16>),
    }

    fn log_op() -> impl Strategy<Value = LogOp> {
        prop_oneof![
            4 => (1u8..6).prop_map(LogOp::Append),
            1 => (0u8..40).prop_map(LogOp::TruncateAfter),
            1 => (0u8..40).prop_map(LogOp::Purge),
            2 => (1u8..8).prop_map(LogOp::Apply),
            3 => (0u8..45, proptest::option::of(0u8..45), proptest::option::of(1u16..200))
                .prop_map(|(s, e, m)| LogOp::Read(s, e, m)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever mix of appends, truncations, purges and reads a log sees, every read gives
        /// exactly what RocksDB holds: the recent entries never answer with anything else.
        #[test]
        fn reads_through_recent_entries_match_the_stored_log(
            ops in proptest::collection::vec(log_op(), 1..60)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let dir = tempfile::tempdir().unwrap();
                let storage = Storage::open(dir.path(), &StorageOptions::small()).unwrap();
                let mut store = storage.log_store::<UnitConfig>(7);
                let mut reader = store.clone();
                let (mut last, mut purged, mut applied) = (0u64, 0u64, 0u64);
                for op in ops {
                    match op {
                        LogOp::Append(n) => {
                            let entries: Vec<_> = (last + 1..=last + u64::from(n))
                                .map(|i| {
                                    let mut e = openraft::testing::blank_ent::<UnitConfig>(1, 1, i);
                                    e.payload = openraft::EntryPayload::Normal(format!("entry {i:0>width$}", width = i as usize % 50));
                                    e
                                })
                                .collect();
                            let (tx, _rx) = UnitConfig::oneshot();
                            store.append(entries, IOFlushed::signal(tx)).await.unwrap();
                            last += u64::from(n);
                        }
                        LogOp::TruncateAfter(i) => {
                            let i = u64::from(i).max(purged);
                            if i < last {
                                let id = (i > 0).then(|| openraft::testing::log_id::<UnitConfig>(1, 1, i));
                                store.truncate_after(id).await.unwrap();
                                last = i;
                                applied = applied.min(last);
                            }
                        }
                        LogOp::Purge(i) => {
                            let i = u64::from(i).min(applied);
                            if i > purged {
                                store.purge(openraft::testing::log_id::<UnitConfig>(1, 1, i)).await.unwrap();
                                purged = i;
                            }
                        }
                        LogOp::Apply(n) => {
                            let upto = (applied + u64::from(n)).min(last);
                            if upto > applied {
                                let from = applied.max(purged) + 1;
                                let got = reader.try_get_log_entries(from..=upto).await.unwrap();
                                let want = store.read_stored(from, Some(upto + 1), None).unwrap();
                                assert_eq!(format!("{got:?}"), format!("{want:?}"));
                                applied = upto;
                            }
                        }
                        LogOp::Read(start, end, max) => {
                            let (start, end) = (u64::from(start), end.map(u64::from));
                            let max = max.map(usize::from);
                            let got = reader.read_entries(start, end, max).unwrap();
                            let want = store.read_stored(start, end, max).unwrap();
                            assert_eq!(format!("{got:?}"), format!("{want:?}"));
                        }
                    }
                    let recent = store.recent();
                    assert!(recent.last_index().is_none() || recent.last_index() == Some(last));
                }
            });
        }
    }

    /// A group that finds the node's budget spent keeps nothing (a cached run must stay the end
    /// of the log), and everything it held goes back to the budget when dropped.
    #[test]
    fn recent_entries_stay_within_the_node_budget() {
        let budget = std::sync::Arc::new(crate::db::MemoryBudget::new(100));
        let entry = |i| openraft::testing::blank_ent::<UnitConfig>(1, 1, i);
        let mut recent = super::RecentEntries::new(budget.clone());
        recent.appended(vec![(entry(1), 40), (entry(2), 40)]);
        assert_eq!(
            (recent.first_index(), recent.last_index()),
            (Some(1), Some(2))
        );
        assert_eq!(budget.used(), 80);
        recent.appended(vec![(entry(3), 40)]);
        assert_eq!(recent.last_index(), None, "over budget: nothing kept");
        assert_eq!(budget.used(), 0);
        recent.appended(vec![(entry(4), 30)]);
        let other =
            super::RecentEntries::<openraft::alias::EntryOf<UnitConfig>>::new(budget.clone());
        assert_eq!(budget.used(), 30);
        drop(recent);
        drop(other);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn index_ranges() {
        assert_eq!(index_range(&(3..7)), (3, Some(7)));
        assert_eq!(index_range(&(3..=7)), (3, Some(8)));
        assert_eq!(index_range(&(3..)), (3, None));
        assert_eq!(index_range(&(..)), (0, None));
        assert_eq!(index_range(&(..=u64::MAX)), (0, None));
        let excl = (
            std::ops::Bound::Excluded(u64::MAX),
            std::ops::Bound::Unbounded,
        );
        assert_eq!(index_range(&excl), (u64::MAX, Some(u64::MAX)));
    }
}
