//! Group commit: one OS thread per node makes the node's journal durable for every waiting
//! writer with a single fsync.
//!
//! Neighbours: [`crate::db::Storage`] starts and owns the flusher, [`crate::journal`] is what it
//! syncs; [`crate::log_store`] queues the `IOFlushed` callbacks of appends and the wake-ups of
//! vote saves here; the state-machine side queues through
//! [`crate::db::Storage::when_durable`].
//!
//! Writers write without sync (so their data is readable at once) and only then queue a
//! completion. The thread takes every completion queued so far, fsyncs the journal once
//! ([`crate::journal::Journal::sync`]) and then runs all of them with its result. Completions
//! queued during an fsync wait for the next one, so under load one fsync serves many groups;
//! fsyncs start at most once per `MIN_FSYNC_INTERVAL`, which adds no latency when idle.
//!
//! Ordering: a completion is queued only after its write returned, so the write is in the
//! journal (in the OS page cache) before the completion is visible to the thread; the thread
//! takes its batch before starting the fsync; so the fsync that completes a batch covers every
//! write of that batch. A completion therefore never runs before its own write is durable. Within one
//! writer, completions run in the order they were queued.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::sync::PoisonError;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::thread;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::journal::Journal;

/// Shortest time between the starts of two fsyncs. Under sustained load an fsync per
/// handful of writes spends a fifth of the node's CPU in the kernel; spacing them lets each
/// cover what arrived meanwhile. An idle node's first write is synced at once. The spacing is
/// also what a commit may wait, on every node that must fsync before a delivery: 1 ms cost
/// about 0.5 ms of end-to-end latency at 2,000 msg/s and a sixth of a single node's
/// throughput (a producer with a confirm window publishes as fast as confirms come back),
/// while a quarter of it shows no CPU cost at full load: an fsync takes 0.1 to 0.6 ms on the
/// benchmark machine, so batches still form behind it (`docs/benchmarks.md`).
const MIN_FSYNC_INTERVAL: Duration = Duration::from_micros(250);

/// What to do once the writes made before it was queued are durable, or their fsync failed.
pub(crate) type Completion = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Counters of the flusher since the storage was opened, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Journal fsyncs done (successful or not).
    pub fsyncs: u64,
    /// Journal fsyncs that failed; each failed every completion of its batch.
    pub fsync_errors: u64,
    /// Completions run (or about to run: counted just before), i.e. append callbacks, vote
    /// saves and [`crate::db::Storage::sync`] waiters.
    pub callbacks_completed: u64,
    /// Most completions served by one fsync.
    pub largest_batch: u64,
}

struct Queue {
    waiting: Vec<Completion>,
    closed: bool,
    /// Test hook: hold completions back so a test can queue many and see them share one fsync.
    #[cfg(test)]
    paused: bool,
}

impl Queue {
    #[cfg(test)]
    fn held(&self) -> bool {
        self.paused && !self.closed
    }

    #[cfg(not(test))]
    fn held(&self) -> bool {
        false
    }
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    fsyncs: AtomicU64,
    fsync_errors: AtomicU64,
    callbacks_completed: AtomicU64,
    largest_batch: AtomicU64,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Completions run outside the lock, so a poisoned lock still holds a consistent queue.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The node-wide flusher thread and its queue.
pub(crate) struct Flusher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Flusher {
    /// Starts the thread that syncs `journal`.
    pub(crate) fn start(journal: Arc<Journal>) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                closed: false,
                #[cfg(test)]
                paused: false,
            }),
            wake: Condvar::new(),
            fsyncs: AtomicU64::new(0),
            fsync_errors: AtomicU64::new(0),
            callbacks_completed: AtomicU64::new(0),
            largest_batch: AtomicU64::new(0),
        });
        let thread = thread::Builder::new()
            .name("warren-wal-sync".into())
            .spawn({
                let shared = shared.clone();
                move || run(&journal, &shared)
            })?;
        Ok(Flusher {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `done` to run after the next journal fsync. The caller must have finished the write
    /// that `done` stands for. Gives `done` back if the flusher is closed.
    pub(crate) fn enqueue(&self, done: Completion) -> Result<(), Completion> {
        let mut queue = self.shared.queue();
        if queue.closed {
            return Err(done);
        }
        queue.waiting.push(done);
        drop(queue);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Refuses new completions, lets the thread sync and run those already queued, and waits
    /// for it to end. Idempotent.
    pub(crate) fn close(&self) {
        self.shared.queue().closed = true;
        self.shared.wake.notify_all();
        let handle = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            // A completion that drops the last storage handle closes us from the flusher thread
            // itself: joining would deadlock, and the thread ends by itself once drained.
            if handle.thread().id() != thread::current().id() && handle.join().is_err() {
                tracing::error!("journal flusher thread panicked");
            }
        }
    }

    /// Whether [`Flusher::close`] has been called.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.queue().closed
    }

    pub(crate) fn stats(&self) -> FlushStats {
        let s = &self.shared;
        FlushStats {
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            fsync_errors: s.fsync_errors.load(Ordering::Relaxed),
            callbacks_completed: s.callbacks_completed.load(Ordering::Relaxed),
            largest_batch: s.largest_batch.load(Ordering::Relaxed),
        }
    }

    /// Test hook: while paused, queued completions wait (closing still drains them).
    #[cfg(test)]
    pub(crate) fn set_paused(&self, paused: bool) {
        self.shared.queue().paused = paused;
        self.shared.wake.notify_all();
    }
}

fn run(journal: &Journal, shared: &Shared) {
    // Swapped with the queue's vector each round so that neither reallocates in steady state.
    let mut batch: Vec<Completion> = Vec::new();
    let mut last_fsync = Instant::now()
        .checked_sub(MIN_FSYNC_INTERVAL)
        .unwrap_or_else(Instant::now);
    loop {
        {
            let mut queue = shared.queue();
            loop {
                if !queue.waiting.is_empty() && !queue.held() {
                    // Right after an fsync, more writers are usually on their way: letting
                    // them join costs at most `MIN_FSYNC_INTERVAL` and saves an fsync.
                    let since = last_fsync.elapsed();
                    if since >= MIN_FSYNC_INTERVAL || queue.closed {
                        break;
                    }
                    queue = shared
                        .wake
                        .wait_timeout(queue, MIN_FSYNC_INTERVAL - since)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    continue;
                }
                if queue.waiting.is_empty() && queue.closed {
                    return;
                }
                queue = shared
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            // Taking the batch before the fsync starts is what makes the fsync cover it.
            std::mem::swap(&mut queue.waiting, &mut batch);
        }

        last_fsync = Instant::now();
        let result = journal.sync();
        // Counted before the completions run, so that whoever sees their completion also sees
        // the counters that include it.
        shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        shared
            .largest_batch
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        shared
            .callbacks_completed
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if let Err(e) = &result {
            shared.fsync_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, waiting = batch.len(), "journal fsync failed");
        }

        for done in batch.drain(..) {
            // io::Error is not Clone: give each waiter its own copy of the failure.
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::other(format!("journal fsync failed: {e}"))),
            };
            // A panicking completion must not take the thread down: every group on the node
            // would then wait forever.
            if std::panic::catch_unwind(AssertUnwindSafe(move || done(r))).is_err() {
                tracing::error!("a durability completion panicked");
            }
        }
    }
}
