//! The node's write journal: what makes RocksDB writes durable, in place of RocksDB's own WAL.
//!
//! Neighbours: [`crate::db::Storage`] sends every write of the node through [`Journal::write`];
//! [`crate::flusher`] makes the journal durable with [`Journal::sync`] for group commit;
//! [`Journal::open`] replays it into the database after a crash.
//!
//! Why not RocksDB's WAL: every fsync of a file that grows also writes the file's metadata
//! (its size, its newly allocated blocks), a second disk write on every group commit. This
//! journal is a ring in one file that is written whole, with zeros, when it is created, and
//! only overwritten after: an fsync writes the data and nothing else, on the benchmark machine
//! 106 µs against 160–200 µs for an append. Without RocksDB's WAL, a write is also copied and
//! written once less (`docs/benchmarks.md`). The zeros cost a new node one write of the ring
//! (`storage.journal_bytes`, 256 MiB by default) before it starts; writing them ahead of the
//! records instead, while the node runs, was tried: their own fsyncs stalled the journal's
//! (confirm p99 15 ms against 4–6 ms).
//!
//! How a write is made durable: under the journal's lock, the batch goes to RocksDB's
//! memtables with the WAL off, then its bytes (RocksDB's own batch encoding) are appended to
//! the ring; an fsync of the journal then covers it. Taking both steps under one lock makes the
//! journal's order the database's order.
//!
//! Layout: two header slots of 4 KiB, then a ring of `capacity` bytes. A record is addressed by
//! its position, which only grows; it lives at `HEADER_LEN + position % capacity`, split over
//! the end of the ring when it does not fit. A record is `len: u32, generation: u32, position:
//! u64, crc32: u32` (big-endian; the checksum covers the other fields and the payload), then
//! `len` bytes of payload. The header holds the checkpoint, the position of the oldest record
//! still needed, and the generation, which every open increments and syncs before it writes.
//!
//! Replay: from the checkpoint, records are applied while each is whole (its checksum), stands
//! where it should (its position) and belongs to a generation no older than the one before it.
//! (A torn header write falls back to the other slot, of the same generation: a new
//! generation's header is synced before its first record, and only checkpoints write after it.)
//! The first record that fails ends the journal: it was torn by the crash, or it is left from an
//! earlier lap of the ring or from before an earlier crash. No write past it was acknowledged,
//! since an fsync covers every write made before it started.
//!
//! Checkpoints: records before position `c` are no longer needed once every write they hold is
//! in RocksDB's table files. When the ring is a quarter full, a thread notes the end `e`,
//! flushes every column family and then stores `c = e` in the header. Replaying records over a
//! database that already holds some of them, in any column family, gives the same database:
//! each key ends with the last value written to it, and nothing but puts, deletes and range
//! deletes is written. That is also why RocksDB's own memtable flushes between checkpoints do
//! no harm.
//!
//! Batches too large for the ring (an eighth of it) are written after a checkpoint, with
//! RocksDB's WAL on and synced: every earlier write is then in table files, so the WAL's copy
//! cannot be replayed out of order with the journal's.

use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::PoisonError;
use std::thread;
use std::thread::JoinHandle;

use rocksdb::DB;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;

use crate::db::COLUMN_FAMILIES;

/// The journal's file name in the data directory.
pub(crate) const JOURNAL_FILE: &str = "journal";
/// Where a new journal is built before it is renamed to [`JOURNAL_FILE`].
const JOURNAL_BUILDING_FILE: &str = "journal.new";
/// Size of the ring unless configured otherwise (`storage.journal_bytes`). The checkpoint keeps
/// it at most a quarter full in steady state; the rest absorbs bursts while a checkpoint's flush
/// runs. A journal of another size is replaced at open, once what it holds is replayed and
/// flushed.
pub(crate) const DEFAULT_CAPACITY: u64 = 256 << 20;
/// Free space a flush needs beyond the memtables' size: the manifest's update, a new WAL
/// file's preallocation, an options file.
const FLUSH_HEADROOM: u64 = 8 << 20;
const HEADER_SLOT: u64 = 4096;
const HEADER_LEN: u64 = 2 * HEADER_SLOT;
const RECORD_HEADER: usize = 20;
const MAGIC: u64 = u64::from_be_bytes(*b"WRNJRNL1");
const HEADER_BYTES: usize = 40;

/// What a header slot holds. The valid slot with the higher `seq` is the current one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    seq: u64,
    capacity: u64,
    checkpoint: u64,
    generation: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&self.seq.to_be_bytes());
        b[16..24].copy_from_slice(&self.capacity.to_be_bytes());
        b[24..32].copy_from_slice(&self.checkpoint.to_be_bytes());
        b[32..36].copy_from_slice(&self.generation.to_be_bytes());
        let crc = crc32fast::hash(&b[0..36]);
        b[36..40].copy_from_slice(&crc.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Header> {
        let b = b.get(..HEADER_BYTES)?;
        if be_u64(b, 0) != MAGIC || be_u32(b, 36) != crc32fast::hash(&b[0..36]) {
            return None;
        }
        let header = Header {
            seq: be_u64(b, 8),
            capacity: be_u64(b, 16),
            checkpoint: be_u64(b, 24),
            generation: be_u32(b, 32),
        };
        (header.capacity > RECORD_HEADER as u64).then_some(header)
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// How journaled batches go to RocksDB: the journal stands in for the WAL.
fn without_wal() -> WriteOptions {
    let mut options = WriteOptions::default();
    options.disable_wal(true);
    options
}

fn record_crc(generation: u32, position: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&(payload.len() as u32).to_be_bytes());
    h.update(&generation.to_be_bytes());
    h.update(&position.to_be_bytes());
    h.update(payload);
    h.finalize()
}

struct State {
    /// Position of the next record.
    end: u64,
    /// Position of the oldest record a replay would need.
    checkpoint: u64,
    header: Header,
    /// Set by the first failed write, fsync or checkpoint: from then on, nothing written can be
    /// reported durable, so every later write and sync fails too.
    failed: Option<String>,
    checkpoint_wanted: bool,
    closed: bool,
    /// Reused for each record, header and payload together, so that it takes one write.
    buffer: Vec<u8>,
    /// Told of the first failure (see [`Journal::on_failure`]).
    on_failure: Option<FailureHandler>,
}

/// What to do once the journal has failed for good.
pub(crate) type FailureHandler = Arc<dyn Fn(&str) + Send + Sync>;

impl State {
    fn usable(&self) -> io::Result<()> {
        if let Some(e) = &self.failed {
            return Err(io::Error::other(format!("the journal failed earlier: {e}")));
        }
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the journal is closed",
            ));
        }
        Ok(())
    }

    fn fail(&mut self, e: &io::Error) -> io::Error {
        if self.failed.is_none() {
            tracing::error!(error = %e, "journal write failed; the node's storage refuses writes from now on");
            self.failed = Some(e.to_string());
            if let Some(handler) = &self.on_failure {
                handler(&e.to_string());
            }
        }
        io::Error::new(e.kind(), format!("journal: {e}"))
    }
}

struct Shared {
    db: Arc<DB>,
    /// The data directory, for the free-space check before a flush.
    dir: PathBuf,
    /// Test hook: the free space the check sees, instead of the file system's.
    #[cfg(test)]
    free_space: Mutex<Option<u64>>,
    file: File,
    capacity: u64,
    state: Mutex<State>,
    /// Signalled when the checkpoint moves (space freed), one is wanted, or the journal closes.
    changed: Condvar,
}

/// The node's journal and the thread that checkpoints it.
pub(crate) struct Journal {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Journal {
    /// Opens the journal in `dir` (creating it, with a ring of `capacity` bytes, if there is
    /// none), replays into `db` every record from the checkpoint on, replaces it with a new one
    /// if its ring is not `capacity` bytes, and starts a new generation. Returns the journal
    /// and how many records it replayed.
    pub(crate) fn open(dir: &Path, db: Arc<DB>, capacity: u64) -> io::Result<(Journal, u64)> {
        let path = dir.join(JOURNAL_FILE);
        let existing = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let (file, header) = match existing {
            None => create(dir, capacity, 0)?,
            Some(file) => match read_header(&file)? {
                Some(header) => (file, header),
                // Created but never given a header (by a build that did not create the file
                // whole first): nothing can have been written to it.
                None if file.metadata()?.len() <= HEADER_LEN => create(dir, capacity, 0)?,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: neither header slot is readable", path.display()),
                    ));
                }
            },
        };
        let mut shared = Shared::new(db, dir, file, header);
        let replayed = shared.replay()?;
        if header.capacity != capacity {
            // Every replayed record goes to table files first, so that the old ring holds
            // nothing the database needs when the new one replaces it.
            shared.flush_all()?;
            let (file, resized) = create(dir, capacity, header.generation)?;
            tracing::info!(from = header.capacity, to = capacity, "resized the journal");
            shared = Shared::new(shared.db, dir, file, resized);
        } else {
            // A journal from a build that grew the ring on its first lap.
            fill_with_zeros(&shared.file, HEADER_LEN + header.capacity)?;
        }
        {
            let mut state = shared.lock();
            let header = state.header;
            let next = Header {
                seq: header.seq + 1,
                generation: header.generation + 1,
                ..header
            };
            shared.store_header(&mut state, next)?;
        }
        let shared = Arc::new(shared);
        let thread = thread::Builder::new()
            .name("warren-checkpoint".into())
            .spawn({
                let shared = shared.clone();
                move || shared.run_checkpoints()
            })?;
        Ok((
            Journal {
                shared,
                thread: Mutex::new(Some(thread)),
            },
            replayed,
        ))
    }

    /// Writes `batch` to the database and appends it to the journal; durable after the next
    /// [`Journal::sync`]. Waits while the ring is full, until a checkpoint frees space.
    pub(crate) fn write(&self, batch: WriteBatch) -> io::Result<()> {
        let s = &*self.shared;
        let mut state = s.lock();
        state.usable()?;
        let len = (RECORD_HEADER + batch.data().len()) as u64;
        if len > s.capacity / 8 {
            return s.write_large(&mut state, batch);
        }
        while state.end + len - state.checkpoint > s.capacity {
            state.checkpoint_wanted = true;
            s.changed.notify_all();
            state = s
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.usable()?;
        }
        let record = s.encode(&mut state, batch.data())?;
        if let Err(e) = s.db.write_opt(batch, &without_wal()) {
            // RocksDB refuses writes after a background error (a failed flush, a full disk)
            // until it is reopened: as final for this node as a failed journal write.
            state.buffer = record;
            return Err(state.fail(&io::Error::other(e)));
        }
        if let Err(e) = s.append(&mut state, record) {
            return Err(state.fail(&e));
        }
        if state.end - state.checkpoint > s.capacity / 4 && !state.checkpoint_wanted {
            state.checkpoint_wanted = true;
            s.changed.notify_all();
        }
        Ok(())
    }

    /// Has `handler` told of the first failure of the journal (at once if it already failed),
    /// from whichever thread meets it. After one, the node can write nothing more until it is
    /// restarted, which replays the journal: the server exits (fail-stop).
    pub(crate) fn on_failure(&self, handler: FailureHandler) {
        let mut state = self.shared.lock();
        match state.failed.clone() {
            Some(e) => {
                drop(state);
                handler(&e);
            }
            None => state.on_failure = Some(handler),
        }
    }

    /// Makes every write that returned before the call durable. Fails, and keeps failing, once
    /// any write or fsync of the journal has failed.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let s = &*self.shared;
        s.lock().usable()?;
        s.file.sync_data().map_err(|e| s.lock().fail(&e))
    }

    /// Flushes the memtables and moves the checkpoint to the end, so that the next open replays
    /// nothing; then refuses further writes and stops the checkpoint thread. Idempotent.
    pub(crate) fn close(&self) {
        let s = &*self.shared;
        {
            let mut state = s.lock();
            if !state.closed
                && state.failed.is_none()
                && let Err(e) = s.checkpoint_now(&mut state)
            {
                tracing::warn!(error = %e, "could not checkpoint the journal on close");
            }
            // In the same hold of the lock: nothing is written after the checkpoint.
            state.closed = true;
        }
        self.stop();
    }

    /// Refuses further writes and stops the checkpoint thread.
    fn stop(&self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("journal checkpoint thread panicked");
        }
    }

    /// Test hook: moves the checkpoint to the end now.
    #[cfg(test)]
    pub(crate) fn checkpoint(&self) -> io::Result<()> {
        let s = &*self.shared;
        let mut state = s.lock();
        s.checkpoint_now(&mut state)
    }

    /// Test hook: positions of the checkpoint and of the end.
    #[cfg(test)]
    pub(crate) fn positions(&self) -> (u64, u64) {
        let state = self.shared.lock();
        (state.checkpoint, state.end)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // Without a checkpoint: a journal dropped without `close` behaves as after a crash.
        self.stop();
    }
}

/// Creates a journal with a ring of `capacity` bytes, every byte of it written (with zeros) and
/// synced, so that no fsync of a record ever has to grow the file or allocate its blocks. The
/// file is built aside and renamed into place: a crash leaves either the old journal or the
/// new one whole.
fn create(dir: &Path, capacity: u64, generation: u32) -> io::Result<(File, Header)> {
    let header = Header {
        // Slot `seq % 2`, as for every header after it.
        seq: 0,
        capacity,
        checkpoint: 0,
        generation,
    };
    let building = dir.join(JOURNAL_BUILDING_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&building)?;
    let mut area = vec![0u8; HEADER_LEN as usize];
    area[..HEADER_BYTES].copy_from_slice(&header.encode());
    file.write_all_at(&area, 0)
        .and_then(|()| fill_with_zeros(&file, HEADER_LEN + capacity))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot create a journal of {capacity} bytes in {} ({e}); \
                     storage.journal_bytes sets its size",
                    dir.display()
                ),
            )
        })?;
    std::fs::rename(&building, dir.join(JOURNAL_FILE))?;
    File::open(dir)?.sync_all()?;
    Ok((file, header))
}

/// Extends `file` to `len` bytes with written zeros and syncs it (data and size).
fn fill_with_zeros(file: &File, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let mut at = file.metadata()?.len();
    if at >= len {
        return Ok(());
    }
    let zeros = vec![0u8; CHUNK as usize];
    while at < len {
        let n = CHUNK.min(len - at);
        file.write_all_at(&zeros[..n as usize], at)?;
        at += n;
    }
    file.sync_all()
}

fn read_header(file: &File) -> io::Result<Option<Header>> {
    let mut slots = [[0u8; HEADER_BYTES]; 2];
    for (i, slot) in slots.iter_mut().enumerate() {
        match file.read_exact_at(slot, i as u64 * HEADER_SLOT) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        }
    }
    Ok(slots
        .iter()
        .filter_map(|s| Header::decode(s))
        .max_by_key(|h| h.seq))
}

impl Shared {
    fn new(db: Arc<DB>, dir: &Path, file: File, header: Header) -> Shared {
        Shared {
            db,
            dir: dir.to_path_buf(),
            #[cfg(test)]
            free_space: Mutex::new(None),
            file,
            capacity: header.capacity,
            state: Mutex::new(State {
                end: header.checkpoint,
                checkpoint: header.checkpoint,
                header,
                failed: None,
                checkpoint_wanted: false,
                closed: false,
                buffer: Vec::new(),
                on_failure: None,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where position `position` lives in the file, and how many bytes fit from there to the
    /// end of the ring.
    fn place(&self, position: u64) -> (u64, u64) {
        let offset = position % self.capacity;
        (HEADER_LEN + offset, self.capacity - offset)
    }

    fn write_ring(&self, position: u64, bytes: &[u8]) -> io::Result<()> {
        let (at, room) = self.place(position);
        let first = bytes.len().min(room as usize);
        self.file.write_all_at(&bytes[..first], at)?;
        if first < bytes.len() {
            self.file.write_all_at(&bytes[first..], HEADER_LEN)?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `position`; false if the file ends first.
    fn read_ring(&self, position: u64, buf: &mut [u8]) -> io::Result<bool> {
        let (at, room) = self.place(position);
        let first = buf.len().min(room as usize);
        let (head, tail) = buf.split_at_mut(first);
        for (part, at) in [(head, at), (tail, HEADER_LEN)] {
            if part.is_empty() {
                continue;
            }
            match self.file.read_exact_at(part, at) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// The record for `payload` at the end of the journal, in the state's reused buffer.
    fn encode(&self, state: &mut State, payload: &[u8]) -> io::Result<Vec<u8>> {
        let position = state.end;
        let generation = state.header.generation;
        let len = u32::try_from(payload.len()).map_err(io::Error::other)?;
        let mut record = std::mem::take(&mut state.buffer);
        record.clear();
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(&generation.to_be_bytes());
        record.extend_from_slice(&position.to_be_bytes());
        record.extend_from_slice(&record_crc(generation, position, payload).to_be_bytes());
        record.extend_from_slice(payload);
        Ok(record)
    }

    /// Writes a record from [`Shared::encode`] at the end of the journal.
    fn append(&self, state: &mut State, record: Vec<u8>) -> io::Result<()> {
        let position = state.end;
        let written = self.write_ring(position, &record);
        state.end = position + record.len() as u64;
        // The buffer is kept for the next record unless it was unusually large.
        if record.capacity() <= 1 << 20 {
            state.buffer = record;
        }
        written
    }

    /// Applies every valid record from the checkpoint on; leaves `end` after the last one.
    fn replay(&self) -> io::Result<u64> {
        let mut state = self.lock();
        let mut position = state.checkpoint;
        let mut last_generation = 0;
        let mut replayed = 0;
        let no_wal = without_wal();
        let mut head = [0u8; RECORD_HEADER];
        let mut payload = Vec::new();
        loop {
            let used = position - state.checkpoint;
            if used + RECORD_HEADER as u64 > self.capacity
                || !self.read_ring(position, &mut head)?
            {
                break;
            }
            let len = u64::from(be_u32(&head, 0));
            let generation = be_u32(&head, 4);
            let at = be_u64(&head, 8);
            let crc = be_u32(&head, 16);
            if at != position
                || generation < last_generation
                || used + RECORD_HEADER as u64 + len > self.capacity
            {
                break;
            }
            payload.resize(len as usize, 0);
            if !self.read_ring(position + RECORD_HEADER as u64, &mut payload)?
                || record_crc(generation, position, &payload) != crc
            {
                break;
            }
            self.db
                .write_opt(WriteBatch::from_data(&payload), &no_wal)
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("journal record at {position} could not be replayed: {e}"),
                    )
                })?;
            last_generation = generation;
            position += RECORD_HEADER as u64 + len;
            replayed += 1;
        }
        state.end = position;
        Ok(replayed)
    }

    fn store_header(&self, state: &mut State, header: Header) -> io::Result<()> {
        let slot = header.seq % 2 * HEADER_SLOT;
        self.file
            .write_all_at(&header.encode(), slot)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| state.fail(&e))?;
        state.header = header;
        state.checkpoint = header.checkpoint;
        Ok(())
    }

    /// Flushes every column family's memtable to table files, waiting for the flushes.
    fn flush_all(&self) -> io::Result<()> {
        self.ensure_room_to_flush()?;
        let mut wait = rocksdb::FlushOptions::default();
        wait.set_wait(true);
        for name in COLUMN_FAMILIES {
            let cf = self
                .db
                .cf_handle(name)
                .ok_or_else(|| io::Error::other(format!("no column family `{name}`")))?;
            self.db.flush_cf_opt(cf, &wait).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Fails unless the data directory has room for the memtables' table files. A flush that
    /// runs out of space does not fail cleanly: RocksDB's file writer, used again after its
    /// failed write, aborts the process on an assertion. Failing here instead makes the node
    /// stop with a message naming the cause (see [`Journal::on_failure`]).
    fn ensure_room_to_flush(&self) -> io::Result<()> {
        let mut memtables = 0;
        for name in COLUMN_FAMILIES {
            if let Some(cf) = self.db.cf_handle(name) {
                memtables += self
                    .db
                    .property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables")
                    .ok()
                    .flatten()
                    .unwrap_or(0);
            }
        }
        let needed = memtables + FLUSH_HEADROOM;
        #[cfg(test)]
        let free = (*self
            .free_space
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
        .or_else(|| crate::resources::disk_free(&self.dir));
        #[cfg(not(test))]
        let free = crate::resources::disk_free(&self.dir);
        match free {
            Some(free) if free < needed => Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "no room to flush the memtables for a checkpoint: {free} bytes free in {}, \
                     {needed} needed",
                    self.dir.display()
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Moves the checkpoint to `end` under the lock (writers wait meanwhile).
    fn checkpoint_now(&self, state: &mut State) -> io::Result<()> {
        let end = state.end;
        self.flush_all().map_err(|e| state.fail(&e))?;
        self.move_checkpoint(state, end)
    }

    fn move_checkpoint(&self, state: &mut State, to: u64) -> io::Result<()> {
        if to > state.checkpoint {
            let next = Header {
                seq: state.header.seq + 1,
                checkpoint: to,
                ..state.header
            };
            self.store_header(state, next)?;
            self.changed.notify_all();
        }
        Ok(())
    }

    /// A batch too large for the ring: every earlier write goes to table files first, then the
    /// batch is written through RocksDB's WAL, synced.
    fn write_large(&self, state: &mut State, batch: WriteBatch) -> io::Result<()> {
        self.checkpoint_now(state)?;
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        self.db
            .write_opt(batch, &sync)
            .map_err(|e| state.fail(&io::Error::other(e)))
    }

    /// The checkpoint thread: when asked, notes the end, flushes without holding the lock (the
    /// flush takes the longest; writers go on meanwhile) and moves the checkpoint there.
    fn run_checkpoints(&self) {
        loop {
            let end = {
                let mut state = self.lock();
                while !state.checkpoint_wanted && !state.closed {
                    state = self
                        .changed
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if state.closed {
                    return;
                }
                state.end
            };
            let flushed = self.flush_all();
            let mut state = self.lock();
            state.checkpoint_wanted = false;
            let moved = flushed
                .map_err(|e| state.fail(&e))
                .and_then(|()| self.move_checkpoint(&mut state, end));
            if moved.is_err() {
                // Writers waiting for space must hear that none will come.
                self.changed.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rocksdb::ColumnFamilyDescriptor;
    use rocksdb::Options;

    use crate::db::CF_LOG;
    use crate::db::CF_SM;

    /// A new journal is written whole: the tests keep theirs small.
    const RING: u64 = 1 << 20;

    fn open_db(dir: &Path) -> Arc<DB> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = COLUMN_FAMILIES
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, Options::default()));
        Arc::new(DB::open_cf_descriptors(&opts, dir, cfs).unwrap())
    }

    fn open(dir: &Path, capacity: u64) -> (Arc<DB>, Journal, u64) {
        let db = open_db(dir);
        let (journal, replayed) = Journal::open(dir, db.clone(), capacity).unwrap();
        (db, journal, replayed)
    }

    /// What a crash leaves: the files as they are now, while the database is still open (its
    /// memtables, which have no WAL behind them, are lost).
    fn crash_copy(from: &Path) -> tempfile::TempDir {
        let to = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), to.path().join(entry.file_name())).unwrap();
            }
        }
        to
    }

    fn put(journal: &Journal, db: &DB, cf: &str, key: &[u8], value: &[u8]) {
        let mut batch = WriteBatch::default();
        batch.put_cf(db.cf_handle(cf).unwrap(), key, value);
        journal.write(batch).unwrap();
    }

    fn get(db: &DB, cf: &str, key: &[u8]) -> Option<Vec<u8>> {
        db.get_cf(db.cf_handle(cf).unwrap(), key).unwrap()
    }

    #[test]
    fn writes_lost_from_the_memtables_in_a_crash_are_replayed_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (db, journal, replayed) = open(dir.path(), RING);
        assert_eq!(replayed, 0);
        for i in 0..100u32 {
            put(&journal, &db, CF_LOG, &i.to_be_bytes(), &[i as u8; 100]);
            put(&journal, &db, CF_SM, b"last", &i.to_be_bytes());
        }
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            db.cf_handle(CF_LOG).unwrap(),
            0u32.to_be_bytes(),
            50u32.to_be_bytes(),
        );
        journal.write(batch).unwrap();
        journal.sync().unwrap();

        let crashed = crash_copy(dir.path());
        let lost = crash_copy(dir.path());
        std::fs::remove_file(lost.path().join(JOURNAL_FILE)).unwrap();
        let without = open_db(lost.path());
        assert_eq!(
            get(&without, CF_SM, b"last"),
            None,
            "the crash must lose the memtables"
        );

        let (db, _journal, replayed) = open(crashed.path(), RING);
        assert_eq!(replayed, 201);
        assert_eq!(get(&db, CF_SM, b"last"), Some(99u32.to_be_bytes().to_vec()));
        assert_eq!(get(&db, CF_LOG, &49u32.to_be_bytes()), None);
        assert_eq!(get(&db, CF_LOG, &50u32.to_be_bytes()), Some(vec![50; 100]));
    }

    #[test]
    fn the_ring_wraps_once_checkpoints_have_freed_it() {
        let dir = tempfile::tempdir().unwrap();
        let capacity = 64 << 10;
        let (db, journal, _) = open(dir.path(), capacity);
        // Sixteen times the ring: writers wait for the checkpoint thread when it is full.
        for i in 0..1_000u32 {
            put(&journal, &db, CF_LOG, &i.to_be_bytes(), &[i as u8; 1_000]);
        }
        journal.sync().unwrap();
        let (checkpoint, end) = journal.positions();
        assert!(end > 10 * capacity, "the ring wrapped: end {end}");
        assert!(end - checkpoint <= capacity);
        let len = std::fs::metadata(dir.path().join(JOURNAL_FILE))
            .unwrap()
            .len();
        assert_eq!(
            len,
            HEADER_LEN + capacity,
            "the file does not grow past the ring"
        );

        let crashed = crash_copy(dir.path());
        let (db, _journal, _) = open(crashed.path(), capacity);
        for i in 0..1_000u32 {
            assert_eq!(
                get(&db, CF_LOG, &i.to_be_bytes()),
                Some(vec![i as u8; 1_000]),
                "key {i}"
            );
        }
    }

    /// Overwrites `len` bytes at `position` of the journal in `dir` with garbage.
    fn tear(dir: &Path, capacity: u64, position: u64, len: usize) {
        let file = OpenOptions::new()
            .write(true)
            .open(dir.join(JOURNAL_FILE))
            .unwrap();
        file.write_all_at(&vec![0xA5; len], HEADER_LEN + position % capacity)
            .unwrap();
    }

    #[test]
    fn a_torn_record_ends_the_replay_and_a_stale_one_behind_it_stays_out() {
        let dir = tempfile::tempdir().unwrap();
        let (db, journal, _) = open(dir.path(), RING);
        put(&journal, &db, CF_SM, b"a", b"1");
        let (_, torn_at) = journal.positions();
        put(&journal, &db, CF_SM, b"b", b"1");
        put(&journal, &db, CF_SM, b"c", b"1");
        journal.sync().unwrap();

        // The crash tore the middle record; the last one reached the disk whole.
        let first = crash_copy(dir.path());
        tear(first.path(), RING, torn_at + RECORD_HEADER as u64, 4);
        let (db, journal, replayed) = open(first.path(), RING);
        assert_eq!(replayed, 1);
        assert_eq!(get(&db, CF_SM, b"a"), Some(b"1".to_vec()));
        assert_eq!(get(&db, CF_SM, b"b"), None);
        assert_eq!(get(&db, CF_SM, b"c"), None);

        // The next run writes a record of the same length where the torn one was: the old "c"
        // now stands where the record after it would be, whole, but from an older generation.
        put(&journal, &db, CF_SM, b"b", b"2");
        journal.sync().unwrap();
        let second = crash_copy(first.path());
        let (db, _journal, replayed) = open(second.path(), RING);
        assert_eq!(replayed, 2);
        assert_eq!(get(&db, CF_SM, b"b"), Some(b"2".to_vec()));
        assert_eq!(get(&db, CF_SM, b"c"), None);
    }

    #[test]
    fn a_batch_too_large_for_the_ring_keeps_its_place_among_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let capacity = 64 << 10;
        let (db, journal, _) = open(dir.path(), capacity);
        put(&journal, &db, CF_SM, b"k", b"before");
        let mut large = WriteBatch::default();
        let sm = db.cf_handle(CF_SM).unwrap();
        large.put_cf(sm, b"k", b"large");
        for i in 0..20u32 {
            large.put_cf(sm, i.to_be_bytes(), [7u8; 1_000]);
        }
        journal.write(large).unwrap();
        put(&journal, &db, CF_SM, b"j", b"after");
        journal.sync().unwrap();

        let crashed = crash_copy(dir.path());
        let (db, _journal, _) = open(crashed.path(), capacity);
        assert_eq!(get(&db, CF_SM, b"k"), Some(b"large".to_vec()));
        assert_eq!(get(&db, CF_SM, b"j"), Some(b"after".to_vec()));
        assert_eq!(get(&db, CF_SM, &19u32.to_be_bytes()), Some(vec![7; 1_000]));
    }

    #[test]
    fn a_torn_header_slot_falls_back_to_the_other() {
        let dir = tempfile::tempdir().unwrap();
        let (db, journal, _) = open(dir.path(), RING);
        put(&journal, &db, CF_SM, b"a", b"1");
        journal.checkpoint().unwrap();
        put(&journal, &db, CF_SM, b"b", b"1");
        journal.sync().unwrap();
        // The crash tore the header written by the checkpoint: the replay starts from the
        // checkpoint before it, which "a" is in the table files and the journal both.
        let crashed = crash_copy(dir.path());
        let current = read_header(&File::open(crashed.path().join(JOURNAL_FILE)).unwrap())
            .unwrap()
            .unwrap();
        let file = OpenOptions::new()
            .write(true)
            .open(crashed.path().join(JOURNAL_FILE))
            .unwrap();
        file.write_all_at(&[0xA5; 8], current.seq % 2 * HEADER_SLOT + 20)
            .unwrap();
        let (db, _journal, replayed) = open(crashed.path(), RING);
        assert_eq!(replayed, 2);
        assert_eq!(get(&db, CF_SM, b"a"), Some(b"1".to_vec()));
        assert_eq!(get(&db, CF_SM, b"b"), Some(b"1".to_vec()));
    }

    #[test]
    fn the_first_failure_is_reported_once_and_every_later_write_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (db, journal, _) = open(dir.path(), RING);
        let told = failures_told(&journal);
        put(&journal, &db, CF_SM, b"a", b"1");
        // A write error of the journal's file, as a failing disk gives.
        {
            let mut state = journal.shared.lock();
            let e = io::Error::other("No space left on device");
            state.fail(&e);
            state.fail(&e);
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(db.cf_handle(CF_SM).unwrap(), b"b", b"1");
        assert!(journal.write(batch).is_err());
        assert!(journal.sync().is_err());
        assert_eq!(told.lock().unwrap().len(), 1);
        // A handler set after the failure hears of it at once.
        let late = Arc::new(Mutex::new(0));
        journal.on_failure(Arc::new({
            let late = late.clone();
            move |_: &str| *late.lock().unwrap() += 1
        }));
        assert_eq!(*late.lock().unwrap(), 1);
    }

    #[test]
    fn close_checkpoints_so_that_the_next_open_replays_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (db, journal, _) = open(dir.path(), RING);
        put(&journal, &db, CF_SM, b"a", b"1");
        journal.close();
        assert!(journal.write(WriteBatch::default()).is_err());
        drop(journal);
        drop(db);
        let (db, _journal, replayed) = open(dir.path(), RING);
        assert_eq!(replayed, 0);
        assert_eq!(get(&db, CF_SM, b"a"), Some(b"1".to_vec()));
    }

    /// What `journal` tells its failure handler, as it tells it.
    fn failures_told(journal: &Journal) -> Arc<Mutex<Vec<String>>> {
        let told = Arc::new(Mutex::new(Vec::new()));
        journal.on_failure(Arc::new({
            let told = told.clone();
            move |e: &str| told.lock().unwrap().push(e.to_string())
        }));
        told
    }

    fn file_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(JOURNAL_FILE)).unwrap().len()
    }

    #[test]
    fn a_new_journal_is_written_whole_before_its_first_record() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, journal, _) = open(dir.path(), RING);
        assert_eq!(file_len(dir.path()), HEADER_LEN + RING);
        assert!(!dir.path().join(JOURNAL_BUILDING_FILE).exists());
        // Written, not a hole: every block of the ring is allocated.
        let blocks = std::os::unix::fs::MetadataExt::blocks(
            &std::fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap(),
        );
        assert!(blocks * 512 >= HEADER_LEN + RING, "{blocks} blocks");
        drop(journal);
    }

    #[test]
    fn a_journal_of_another_size_is_replayed_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (db, journal, _) = open(dir.path(), 64 << 10);
        for i in 0..20u32 {
            put(&journal, &db, CF_LOG, &i.to_be_bytes(), &[i as u8; 100]);
        }
        journal.sync().unwrap();

        let crashed = crash_copy(dir.path());
        let (db, journal, replayed) = open(crashed.path(), 128 << 10);
        assert_eq!(replayed, 20);
        assert_eq!(file_len(crashed.path()), HEADER_LEN + (128 << 10));
        put(&journal, &db, CF_SM, b"after", b"1");
        journal.sync().unwrap();

        // The records of the old ring are gone with it: what they held must be in table files.
        let again = crash_copy(crashed.path());
        let (db, _journal, replayed) = open(again.path(), 128 << 10);
        assert_eq!(replayed, 1);
        assert_eq!(get(&db, CF_SM, b"after"), Some(b"1".to_vec()));
        for i in 0..20u32 {
            assert_eq!(
                get(&db, CF_LOG, &i.to_be_bytes()),
                Some(vec![i as u8; 100]),
                "key {i}"
            );
        }
    }

    #[test]
    fn a_ring_grown_by_an_earlier_build_is_filled_to_its_size_after_its_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (db, journal, _) = open(dir.path(), RING);
        for i in 0..20u32 {
            put(&journal, &db, CF_LOG, &i.to_be_bytes(), &[i as u8; 100]);
        }
        journal.sync().unwrap();
        let (_, end) = journal.positions();

        // An earlier build left the file ending with its last record.
        let crashed = crash_copy(dir.path());
        OpenOptions::new()
            .write(true)
            .open(crashed.path().join(JOURNAL_FILE))
            .unwrap()
            .set_len(HEADER_LEN + end)
            .unwrap();
        let (db, _journal, replayed) = open(crashed.path(), RING);
        assert_eq!(replayed, 20);
        assert_eq!(get(&db, CF_LOG, &19u32.to_be_bytes()), Some(vec![19; 100]));
        assert_eq!(file_len(crashed.path()), HEADER_LEN + RING);
    }

    #[test]
    fn a_checkpoint_without_room_to_flush_fails_the_journal_before_rocksdb_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (db, journal, _) = open(dir.path(), RING);
        let told = failures_told(&journal);
        put(&journal, &db, CF_SM, b"a", b"1");
        *journal.shared.free_space.lock().unwrap() = Some(FLUSH_HEADROOM);
        let e = journal.checkpoint().unwrap_err();
        assert!(e.to_string().contains("no room to flush"), "{e}");
        assert_eq!(told.lock().unwrap().len(), 1);
        let files = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|f| f.as_ref().unwrap().path().extension() == Some("sst".as_ref()))
            .count();
        assert_eq!(files, 0, "nothing was flushed");
        assert!(journal.write(WriteBatch::default()).is_err());
    }
}
