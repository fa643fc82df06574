//! The node's one RocksDB instance, shared by every Raft group on the node.
//!
//! A node hosts one metadata group and one group per durable queue, possibly hundreds in all.
//! Giving each its own RocksDB would multiply WAL files, background threads and fsyncs, so they
//! all share one database opened here by [`Storage`], and tell their data apart by a key prefix:
//! the [`GroupId`] as 8 big-endian bytes, so that one group's keys are contiguous and sort by
//! what follows the prefix (see [`keys`]).
//!
//! Column families:
//! - [`CF_LOG`]: Raft log entries, written by [`crate::log_store`];
//! - [`CF_META`]: per-group vote, committed and last-purged log ids, also [`crate::log_store`];
//! - [`CF_SM`] and [`CF_SNAPSHOT`]: state-machine data and snapshots, for the state-machine side,
//!   which reaches them through [`Storage::db`] and [`Storage::cf`].
//!
//! Every write goes through [`Storage::write`] and so through the node's one
//! [`crate::journal`], in place of RocksDB's WAL: durability is prefix-ordered across all
//! column families and groups, and once the journal is synced, everything written before is
//! durable. The [`crate::flusher`] builds group commit on that, and [`Storage::when_durable`]
//! / [`Storage::sync`] let the state-machine side share it.
//!
//! Values are encoded by [`encode`] / [`decode`]: one format byte, then postcard. The
//! database records the [`STORAGE_FORMAT`] it was written in, and a database of another
//! format is refused at open rather than misread.

use std::fmt;
use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rocksdb::ColumnFamily;
use rocksdb::ColumnFamilyDescriptor;
use rocksdb::DB;
use rocksdb::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::flusher::Completion;
use crate::flusher::FlushStats;
use crate::flusher::Flusher;
use crate::journal;
use crate::journal::Journal;
use crate::log_store::LogStore;

/// Identifies one Raft group on a node: the metadata group or one durable queue's group.
pub type GroupId = u64;

/// Column family of Raft log entries: key = group prefix + log index (both big-endian u64).
pub const CF_LOG: &str = "log";
/// Column family of per-group Raft metadata: key = group prefix + a short tag.
pub const CF_META: &str = "meta";
/// Column family reserved for state-machine data; keys should start with the group prefix.
pub const CF_SM: &str = "sm";
/// Column family reserved for snapshots; keys should start with the group prefix.
pub const CF_SNAPSHOT: &str = "snapshot";

/// Memory all memtables of a node may take together.
const MEMTABLE_BUDGET: usize = 64 << 20;
/// RocksDB WAL size past which the oldest memtables are flushed. Only writes too large for the
/// journal, and databases written before the journal, use the WAL.
const WAL_LIMIT: u64 = 128 << 20;

/// Every column family this crate creates, in creation order.
pub const COLUMN_FAMILIES: [&str; 4] = [CF_LOG, CF_META, CF_SM, CF_SNAPSHOT];

/// The first byte of every value written by [`encode`] (on disk and between nodes): the
/// format it is in, so that a value of another format is refused, never misread. Bumped with
/// every change to the shape of an encoded value (2: queue `Configure` carries a version;
/// 3: queues remember the publishers of closed channels; 4: staged transactions in queues and
/// transaction decisions in the metadata; 5: paged-out index entries of deep queues; 6: queue
/// commands carry their proposer's numbering, queues keep the last number taken; 7: a log
/// entry may carry a batch of queue commands).
const FORMAT_POSTCARD: u8 = 7;

/// The version of everything this build keeps in the database; recorded in it when it is
/// created and checked at every open. It follows [`FORMAT_POSTCARD`] up to 7; 8: writes are
/// made durable by the journal ([`crate::journal`]) rather than RocksDB's WAL, so a build that
/// knows nothing of the journal must not open the database (it would miss writes that are only
/// in the journal, and its own writes could be replayed over later).
pub const STORAGE_FORMAT: u8 = 8;
/// A database of this format differs from [`STORAGE_FORMAT`] only in having no journal yet:
/// it is upgraded in place at open.
const UPGRADED_IN_PLACE: u8 = 7;

/// Where the database records its format, among the node's own keys.
fn format_key() -> Vec<u8> {
    keys::group_key(keys::NODE_KEYS, b"storage_format")
}

/// Errors from opening or reading the node database outside of the openraft traits (which
/// speak [`io::Error`]; this converts into it).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("rocksdb: {0}")]
    RocksDb(#[from] rocksdb::Error),
    #[error("column family `{0}` is missing")]
    MissingColumnFamily(&'static str),
    #[error("cannot encode value: {0}")]
    Encode(#[source] postcard::Error),
    #[error("cannot decode value: {0}")]
    Decode(#[source] postcard::Error),
    #[error("value in format {0}, this build reads format {FORMAT_POSTCARD} (another version?)")]
    UnknownFormat(u8),
    #[error(
        "the data directory {path} holds storage format {found}, this build reads format \
         {STORAGE_FORMAT} (and upgrades format {UPGRADED_IN_PLACE} in place): start this node \
         on an empty data_dir (it catches up from its peers) or with the version that wrote it"
    )]
    IncompatibleFormat { path: String, found: u8 },
    #[error("empty value where an encoded one was expected")]
    EmptyValue,
    #[error("cannot start the journal flusher thread: {0}")]
    Flusher(#[source] io::Error),
    #[error("journal: {0}")]
    Journal(#[source] io::Error),
    #[error("storage is closed")]
    Closed,
}

impl From<DbError> for io::Error {
    fn from(e: DbError) -> Self {
        let kind = match &e {
            DbError::Decode(_) | DbError::UnknownFormat(_) | DbError::EmptyValue => {
                io::ErrorKind::InvalidData
            }
            DbError::Encode(_) => io::ErrorKind::InvalidInput,
            DbError::Closed => io::ErrorKind::BrokenPipe,
            DbError::Flusher(inner) | DbError::Journal(inner) => inner.kind(),
            DbError::RocksDb(_)
            | DbError::MissingColumnFamily(_)
            | DbError::IncompatibleFormat { .. } => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Key layout shared by all column families: `group (8 bytes BE) ++ suffix`.
///
/// Big-endian keeps numeric order equal to byte order, which RocksDB iterates in.
pub mod keys {
    use super::GroupId;

    /// Length of the group prefix.
    pub const PREFIX_LEN: usize = 8;

    /// The prefix of keys in the `meta` column family that belong to the node, not to a
    /// group (its id, its incarnation, the storage format); no group has this id.
    pub const NODE_KEYS: GroupId = u64::MAX;

    /// Meta tag of the saved vote.
    pub const TAG_VOTE: &[u8] = b"vote";
    /// Meta tag of the saved committed log id.
    pub const TAG_COMMITTED: &[u8] = b"committed";
    /// Meta tag of the last purged log id.
    pub const TAG_LAST_PURGED: &[u8] = b"last_purged";

    /// The 8-byte prefix of every key of `group`.
    pub fn group_prefix(group: GroupId) -> [u8; PREFIX_LEN] {
        group.to_be_bytes()
    }

    /// Smallest key greater than every key of `group`, or `None` for the last possible group
    /// (whose keys are then bounded only by the end of the column family).
    pub fn group_upper_bound(group: GroupId) -> Option<[u8; PREFIX_LEN]> {
        group.checked_add(1).map(group_prefix)
    }

    /// `group` prefix followed by `suffix`: the key form of every column family.
    pub fn group_key(group: GroupId, suffix: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(PREFIX_LEN + suffix.len());
        k.extend_from_slice(&group_prefix(group));
        k.extend_from_slice(suffix);
        k
    }

    /// Key of the log entry at `index` of `group`.
    pub fn log_key(group: GroupId, index: u64) -> [u8; 16] {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&group.to_be_bytes());
        k[8..].copy_from_slice(&index.to_be_bytes());
        k
    }

    /// Exclusive upper bound for log keys of `group` with index `< end`; `None` means no index
    /// limit. The unlimited form is 17 bytes: it sorts after every 16-byte log key of `group`
    /// (including index `u64::MAX`) and before any key of the next group.
    pub fn log_key_bound(group: GroupId, end: Option<u64>) -> Vec<u8> {
        match end {
            Some(end) => log_key(group, end).to_vec(),
            None => {
                let mut k = log_key(group, u64::MAX).to_vec();
                k.push(0);
                k
            }
        }
    }

    /// The log index of a 16-byte log key, if it has that length.
    pub fn log_index(key: &[u8]) -> Option<u64> {
        let index: [u8; 8] = key.get(PREFIX_LEN..)?.try_into().ok()?;
        Some(u64::from_be_bytes(index))
    }
}

/// Encodes `value` in the on-disk format of this crate: one format byte, then postcard.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, DbError> {
    postcard::to_extend(value, vec![FORMAT_POSTCARD]).map_err(DbError::Encode)
}

/// Decodes a value written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DbError> {
    match bytes.split_first() {
        Some((&FORMAT_POSTCARD, rest)) => postcard::from_bytes(rest).map_err(DbError::Decode),
        Some((&other, _)) => Err(DbError::UnknownFormat(other)),
        None => Err(DbError::EmptyValue),
    }
}

/// Handle to the node's RocksDB, its journal and their flusher; cheap to clone.
///
/// One per node. Each Raft group gets its [`LogStore`] from [`Storage::log_store`]; every store
/// keeps the database (and the flusher thread) alive, so it closes when the last handle is gone,
/// or earlier through [`Storage::close`].
#[derive(Clone)]
pub struct Storage {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    journal: Arc<Journal>,
    flusher: Flusher,
    path: PathBuf,
    recent_entries: Arc<MemoryBudget>,
    unwritten_bodies: Arc<MemoryBudget>,
}

/// Memory the node's groups may hold in one kind of cache together, in bytes. Caches here are
/// copies of what RocksDB holds or will hold, so a group that finds the budget spent does
/// without (reads or writes RocksDB as it would with no cache) instead of waiting.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicUsize,
    limit: usize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Self {
        MemoryBudget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `bytes` if they fit; `false` (taking nothing) if they do not.
    pub fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Gives back bytes taken earlier.
    pub fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Bytes taken now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// One holder's part of a [`MemoryBudget`]: what it took and has not given back yet, all of
/// which goes back when the share is dropped.
#[derive(Debug)]
pub struct MemoryShare {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

impl MemoryShare {
    pub fn new(budget: Arc<MemoryBudget>) -> Self {
        MemoryShare { budget, bytes: 0 }
    }

    /// What this holder has taken.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes `bytes` more from the budget if they fit there; `false` (taking nothing) if not.
    pub fn try_take(&mut self, bytes: usize) -> bool {
        let taken = self.budget.try_take(bytes);
        if taken {
            self.bytes += bytes;
        }
        taken
    }

    /// Gives back `bytes` of what this holder took.
    pub fn give_back(&mut self, bytes: usize) {
        self.bytes -= bytes;
        self.budget.give_back(bytes);
    }

    /// Gives back everything this holder took.
    pub fn give_back_all(&mut self) {
        self.give_back(self.bytes);
    }
}

impl Drop for MemoryShare {
    fn drop(&mut self) {
        self.give_back_all();
    }
}

/// Size at which RocksDB's info log (`LOG`) starts a new file, and how many it keeps.
const ROCKSDB_LOG_FILE_SIZE: usize = 16 << 20;
const ROCKSDB_LOG_FILES: usize = 4;

/// What the log stores of a node may keep of recently appended entries, together
/// ([`crate::log_store`]).
const RECENT_ENTRIES_BUDGET: usize = 64 << 20;
/// What the queue state machines of a node may keep of bodies not yet written to the `sm`
/// column family, together ([`crate::queue_sm`]).
const UNWRITTEN_BODIES_BUDGET: usize = 128 << 20;

/// Size of a node's journal unless configured otherwise ([`StorageOptions::journal_bytes`]).
pub const DEFAULT_JOURNAL_BYTES: u64 = journal::DEFAULT_CAPACITY;

/// How a node's storage is laid out on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageOptions {
    /// Size of the journal's ring (`crate::journal`): written whole when the node is created,
    /// so a new node writes this much before it starts; a checkpoint flushes the memtables
    /// every quarter of it.
    pub journal_bytes: u64,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            journal_bytes: DEFAULT_JOURNAL_BYTES,
        }
    }
}

#[cfg(test)]
impl StorageOptions {
    /// A small journal: tests create many nodes, and a new node writes its journal whole.
    pub(crate) fn small() -> Self {
        StorageOptions {
            journal_bytes: 1 << 20,
        }
    }
}

impl Storage {
    /// Opens (creating if needed) the node database in directory `path` with all
    /// [`COLUMN_FAMILIES`], replays the journal and starts the flusher thread.
    pub fn open(path: impl AsRef<Path>, options: &StorageOptions) -> Result<Self, DbError> {
        let path = path.as_ref().to_path_buf();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The few writes that go through RocksDB's WAL (see `crate::journal`) are synced
        // writes; after a crash, recover the longest consistent prefix of it (the default).
        opts.set_manual_wal_flush(false);
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // Memtables of all column families share one budget, and the WAL is kept short by
        // flushing the memtables its oldest file covers: a node's memory does not grow with
        // the write rate.
        opts.set_db_write_buffer_size(MEMTABLE_BUDGET);
        opts.set_max_total_wal_size(WAL_LIMIT);
        // RocksDB's own log (`LOG` in the data directory): at its debug level, which the
        // system library defaults to, it gains a line with every WAL fsync — 1,000 a second
        // under load, and it is never rotated by default. Info keeps flushes, compactions and
        // errors; the size limit and file count bound it.
        opts.set_log_level(rocksdb::LogLevel::Info);
        opts.set_max_log_file_size(ROCKSDB_LOG_FILE_SIZE);
        opts.set_keep_log_file_num(ROCKSDB_LOG_FILES);

        let cfs = COLUMN_FAMILIES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        let db = Arc::new(DB::open_cf_descriptors(&opts, &path, cfs)?);
        for name in COLUMN_FAMILIES {
            if db.cf_handle(name).is_none() {
                return Err(DbError::MissingColumnFamily(name));
            }
        }
        // Before anything reads the database: writes of the last run may be in the journal only.
        let (journal, replayed) =
            Journal::open(&path, db.clone(), options.journal_bytes).map_err(DbError::Journal)?;
        if replayed > 0 {
            tracing::info!(records = replayed, "replayed the journal");
        }
        let journal = Arc::new(journal);
        let flusher = Flusher::start(journal.clone()).map_err(DbError::Flusher)?;
        let storage = Storage {
            inner: Arc::new(Inner {
                db,
                journal,
                flusher,
                path,
                recent_entries: Arc::new(MemoryBudget::new(RECENT_ENTRIES_BUDGET)),
                unwritten_bodies: Arc::new(MemoryBudget::new(UNWRITTEN_BODIES_BUDGET)),
            }),
        };
        check_format(&storage)?;
        Ok(storage)
    }

    /// The RocksDB instance, for reading. Never write through it: a write that bypasses
    /// [`Storage::write`] is not journaled, so it is lost in a crash, and a replay of the journal
    /// could order it wrongly against journaled writes.
    pub fn db(&self) -> &Arc<DB> {
        &self.inner.db
    }

    /// Writes `batch` (atomically), durable after the next fsync of the journal: wait with
    /// [`Storage::when_durable`] or [`Storage::sync`], which share the node's fsyncs. Refused
    /// once the storage is closed: nothing should be written that could never be made durable.
    pub fn write(&self, batch: rocksdb::WriteBatch) -> Result<(), DbError> {
        self.ensure_open()?;
        self.inner.journal.write(batch).map_err(DbError::Journal)
    }

    /// Calls `handler` with the error once the node's storage has failed for good (a journal
    /// write, fsync or checkpoint, or a RocksDB write, failed): from then on every write and
    /// sync fails, so the node can make no more progress until it restarts, and the restart
    /// replays the journal. The server exits there; tests leave it unset.
    pub fn on_failure(&self, handler: impl Fn(&str) + Send + Sync + 'static) {
        self.inner.journal.on_failure(Arc::new(handler));
    }

    /// Writes `batch` and makes it durable before returning, with an fsync of its own: for the
    /// rare writes that must be durable before the caller goes on (snapshots, the node's
    /// identity) and can afford to wait on a thread of their own.
    pub fn write_durably(&self, batch: rocksdb::WriteBatch) -> Result<(), DbError> {
        self.write(batch)?;
        self.inner.journal.sync().map_err(DbError::Journal)
    }

    /// Handle of one of the [`COLUMN_FAMILIES`].
    ///
    /// # Panics
    /// If `name` is not one of them: their presence is checked at open.
    pub fn cf(&self, name: &str) -> &ColumnFamily {
        self.inner
            .db
            .cf_handle(name)
            .unwrap_or_else(|| panic!("unknown column family `{name}`"))
    }

    /// The directory the database lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The budget the node's log stores share for their recent entries.
    pub fn recent_entries_budget(&self) -> &Arc<MemoryBudget> {
        &self.inner.recent_entries
    }

    /// The budget the node's queue state machines share for bodies not yet on disk.
    pub fn unwritten_bodies_budget(&self) -> &Arc<MemoryBudget> {
        &self.inner.unwritten_bodies
    }

    /// The log store of `group`. Stores of different groups are independent; stores of the same
    /// group are clones of each other (openraft wants one per `Raft`).
    pub fn log_store<C: openraft::RaftTypeConfig>(&self, group: GroupId) -> LogStore<C>
    where
        C::Entry: Clone,
    {
        LogStore::new(self.clone(), group)
    }

    /// Calls `done` once everything written to the database before this call is durable (or
    /// with the error of the fsync that should have made it so), from the flusher thread: keep
    /// `done` short. Calls it at once with an error if the storage is closed.
    pub fn when_durable(&self, done: impl FnOnce(io::Result<()>) + Send + 'static) {
        // On a closed storage `done` has already been told; nothing more to report.
        let _ = self.queue_completion(Box::new(done));
    }

    /// Queues `done` on the flusher; if the storage is closed, runs it with that error and
    /// returns the error too.
    pub(crate) fn queue_completion(&self, done: Completion) -> Result<(), DbError> {
        self.inner.flusher.enqueue(done).map_err(|done| {
            done(Err(DbError::Closed.into()));
            DbError::Closed
        })
    }

    /// Resolves once everything written before the call is durable. Shares the fsync with
    /// concurrent appends of all groups.
    pub async fn sync(&self) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.when_durable(move |res| {
            // The receiver is gone only if the caller stopped waiting; nothing to tell then.
            let _ = tx.send(res);
        });
        rx.await.unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "journal flusher stopped",
            ))
        })
    }

    /// Fails with [`DbError::Closed`] once [`Storage::close`] has been called: writers check
    /// this first so that nothing is written that could never be reported durable.
    pub(crate) fn ensure_open(&self) -> Result<(), DbError> {
        if self.inner.flusher.is_closed() {
            Err(DbError::Closed)
        } else {
            Ok(())
        }
    }

    /// The groups that have a Raft log here (metadata group included).
    pub fn stored_groups(&self) -> Result<Vec<GroupId>, DbError> {
        let cf = self.cf(CF_LOG);
        let mut groups = Vec::new();
        let mut next = Some(keys::group_prefix(0).to_vec());
        // One seek per group: jump past each group's keys instead of reading them all.
        while let Some(from) = next.take() {
            let mut iter = self.db().raw_iterator_cf(cf);
            iter.seek(&from);
            if !iter.valid() {
                iter.status()?;
                break;
            }
            let Some(key) = iter.key() else { break };
            let Some(prefix) = key.get(..keys::PREFIX_LEN) else {
                break;
            };
            let group = u64::from_be_bytes(prefix.try_into().unwrap_or([0xff; 8]));
            groups.push(group);
            next = keys::group_upper_bound(group).map(|k| k.to_vec());
        }
        Ok(groups)
    }

    /// Counters of the group-commit flusher.
    pub fn flush_stats(&self) -> FlushStats {
        self.inner.flusher.stats()
    }

    /// Stops the flusher after it has synced and completed everything queued so far. Later
    /// writes and [`Storage::sync`] calls fail; reads still work. The database itself closes
    /// when the last handle is dropped. Idempotent.
    pub fn close(&self) {
        self.inner.flusher.close();
        // Memtables written to table files now are not replayed from the journal at the next
        // open, which keeps a graceful restart quick whatever was written before it.
        self.inner.journal.close();
    }

    #[cfg(test)]
    pub(crate) fn flusher(&self) -> &Flusher {
        &self.inner.flusher
    }
}

/// Records the format in a new database; refuses one written in another format (one with
/// data but no record is from before formats were recorded: format 1).
fn check_format(storage: &Storage) -> Result<(), DbError> {
    let db = storage.db();
    let meta = db
        .cf_handle(CF_META)
        .ok_or(DbError::MissingColumnFamily(CF_META))?;
    let record_current = || {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put_cf(meta, format_key(), [STORAGE_FORMAT]);
        storage.write_durably(batch)
    };
    let found = match db.get_cf(meta, format_key())? {
        Some(v) => v.first().copied().unwrap_or(0),
        None => {
            let has_data = COLUMN_FAMILIES.iter().any(|name| {
                db.cf_handle(name).is_some_and(|cf| {
                    db.iterator_cf(cf, rocksdb::IteratorMode::Start)
                        .next()
                        .is_some()
                })
            });
            if has_data {
                1
            } else {
                record_current()?;
                STORAGE_FORMAT
            }
        }
    };
    if found == UPGRADED_IN_PLACE {
        record_current()?;
        tracing::info!(
            from = UPGRADED_IN_PLACE,
            to = STORAGE_FORMAT,
            "storage format upgraded"
        );
        Ok(())
    } else if found == STORAGE_FORMAT {
        Ok(())
    } else {
        Err(DbError::IncompatibleFormat {
            path: storage.path().display().to_string(),
            found,
        })
    }
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Storage")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Drain and join the flusher before the DB handle goes: the thread holds its own Arc,
        // so this also lets RocksDB close here rather than whenever the thread happens to end.
        self.flusher.close();
    }
}

#[cfg(test)]
mod tests {
    use super::keys::*;
    use super::*;

    /// Every fsync of RocksDB's WAL used to add a line to RocksDB's info log, which nothing
    /// rotated: a node under load grew it by about 100 KB a second. The journal's fsyncs must
    /// not bring that back.
    #[tokio::test]
    async fn fsyncs_leave_rocksdb_info_log_alone() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), &StorageOptions::small()).unwrap();
        for i in 0..50u32 {
            let mut batch = rocksdb::WriteBatch::default();
            batch.put_cf(storage.cf(CF_SM), i.to_be_bytes(), b"x");
            storage.write(batch).unwrap();
            storage.sync().await.unwrap();
        }
        assert!(storage.flush_stats().fsyncs >= 1);
        storage.close();
        drop(storage);
        let log = std::fs::read_to_string(dir.path().join("LOG")).unwrap();
        assert!(
            !log.contains("FlushWAL"),
            "{}",
            &log[log.len().saturating_sub(500)..]
        );
    }

    #[test]
    fn a_memory_budget_refuses_what_does_not_fit_and_takes_back_what_is_given() {
        let budget = MemoryBudget::new(100);
        assert!(budget.try_take(60));
        assert!(!budget.try_take(41), "61 + 41 > 100");
        assert_eq!(budget.used(), 60, "a refused take takes nothing");
        assert!(budget.try_take(40));
        budget.give_back(60);
        assert_eq!(budget.used(), 40);
        assert!(!budget.try_take(usize::MAX), "no overflow");
    }

    #[test]
    fn a_memory_share_gives_back_what_it_took_when_dropped() {
        let budget = Arc::new(MemoryBudget::new(100));
        let mut share = MemoryShare::new(budget.clone());
        assert!(share.try_take(70));
        assert!(!share.try_take(31), "the budget, not the share, refuses");
        assert_eq!((share.bytes(), budget.used()), (70, 70));
        share.give_back(20);
        assert_eq!((share.bytes(), budget.used()), (50, 50));
        drop(share);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn log_keys_sort_by_group_then_index() {
        let mut ks = vec![
            log_key(2, 0),
            log_key(1, u64::MAX),
            log_key(1, 256),
            log_key(1, 255),
            log_key(0, 7),
        ];
        ks.sort();
        assert_eq!(
            ks,
            vec![
                log_key(0, 7),
                log_key(1, 255),
                log_key(1, 256),
                log_key(1, u64::MAX),
                log_key(2, 0)
            ]
        );
        let bound = log_key_bound(1, None);
        assert!(log_key(1, u64::MAX).as_slice() < bound.as_slice());
        assert!(bound.as_slice() < log_key(2, 0).as_slice());
        assert_eq!(log_index(&log_key(9, 42)), Some(42));
        assert_eq!(group_upper_bound(u64::MAX), None);
        assert_eq!(group_upper_bound(1), Some(group_prefix(2)));
    }

    #[test]
    fn values_round_trip_and_reject_unknown_formats() {
        let v = (7u64, String::from("x"), Some(3u32));
        let bytes = encode(&v).unwrap();
        assert_eq!(bytes[0], FORMAT_POSTCARD);
        assert_eq!(decode::<(u64, String, Option<u32>)>(&bytes).unwrap(), v);
        assert!(matches!(
            decode::<u64>(&[9, 1]),
            Err(DbError::UnknownFormat(9))
        ));
        assert!(matches!(decode::<u64>(&[]), Err(DbError::EmptyValue)));
        assert!(matches!(
            decode::<u64>(&[1, 1]),
            Err(DbError::UnknownFormat(1))
        ));
    }

    #[test]
    fn a_database_of_another_format_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let storage = Storage::open(&path, &StorageOptions::small()).expect("a new database opens");
        drop(storage);
        Storage::open(&path, &StorageOptions::small())
            .expect("and opens again")
            .close();
        // A database whose record names another format, as a build of that format leaves it.
        {
            let db = DB::open_cf(&Options::default(), &path, COLUMN_FAMILIES).unwrap();
            db.put_cf(
                db.cf_handle(CF_META).unwrap(),
                format_key(),
                [STORAGE_FORMAT + 1],
            )
            .unwrap();
        }
        let err =
            Storage::open(&path, &StorageOptions::small()).expect_err("another format is refused");
        assert!(matches!(err, DbError::IncompatibleFormat { .. }), "{err}");
        assert!(err.to_string().contains("data_dir"), "{err}");
        // Written before formats were recorded: data, no record.
        let old = dir.path().join("old");
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let db = DB::open_cf(&opts, &old, COLUMN_FAMILIES).unwrap();
            db.put_cf(db.cf_handle(CF_LOG).unwrap(), log_key(1, 1), [1, 0])
                .unwrap();
        }
        assert!(matches!(
            Storage::open(&old, &StorageOptions::small()),
            Err(DbError::IncompatibleFormat { found: 1, .. })
        ));
    }

    #[test]
    fn a_database_from_before_the_journal_is_upgraded_with_what_its_wal_held() {
        let dir = tempfile::tempdir().unwrap();
        // As the build before the journal left it after a crash: format 7, the last write in
        // RocksDB's WAL only.
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            opts.create_missing_column_families(true);
            let db = DB::open_cf(&opts, dir.path(), COLUMN_FAMILIES).unwrap();
            db.put_cf(db.cf_handle(CF_META).unwrap(), format_key(), [7])
                .unwrap();
            db.put_cf(db.cf_handle(CF_LOG).unwrap(), log_key(1, 1), [1, 0])
                .unwrap();
        }
        let storage =
            Storage::open(dir.path(), &StorageOptions::small()).expect("format 7 is upgraded");
        let db = storage.db();
        assert_eq!(
            db.get_cf(storage.cf(CF_LOG), log_key(1, 1)).unwrap(),
            Some(vec![1, 0])
        );
        assert_eq!(
            db.get_cf(storage.cf(CF_META), format_key()).unwrap(),
            Some(vec![STORAGE_FORMAT])
        );
        // The upgrade is durable: a crash right after it (no close) keeps it.
        drop(storage);
        let storage = Storage::open(dir.path(), &StorageOptions::small()).unwrap();
        assert_eq!(
            storage
                .db()
                .get_cf(storage.cf(CF_META), format_key())
                .unwrap(),
            Some(vec![STORAGE_FORMAT])
        );
    }
}
