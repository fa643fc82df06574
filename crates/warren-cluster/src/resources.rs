//! Resource alarms: the node watches its own memory (resident set) and the free space of
//! the file system its data lives on, and raises an alarm when memory goes over the high
//! watermark or free disk space under its limit, as RabbitMQ does.
//!
//! The server's connections subscribe (`subscribe`) and block publishers while an alarm is
//! on (connection.blocked / unblocked); the admin service (`admin`) reads and changes the
//! limits at run time (`warrenctl resource-limits`). Linux only: the figures come from
//! `/proc` and `statvfs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

/// How often the figures are read.
const CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct ResourceMonitor {
    /// Resident memory above which the memory alarm is on (bytes; 0: never).
    memory_high_watermark: AtomicU64,
    /// Free disk space below which the disk alarm is on (bytes; 0: never).
    disk_free_limit: AtomicU64,
    data_dir: PathBuf,
    /// The alarm's reason (`low on memory`, `low on disk`), None when clear.
    alarm: watch::Sender<Option<String>>,
}

/// The current limits and figures, for status and the admin service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceReport {
    pub memory_high_watermark: u64,
    pub disk_free_limit: u64,
    pub memory_used: Option<u64>,
    pub disk_free: Option<u64>,
    pub alarm: Option<String>,
}

impl ResourceMonitor {
    pub fn new(data_dir: PathBuf, memory_high_watermark: u64, disk_free_limit: u64) -> Arc<Self> {
        let (alarm, _) = watch::channel(None);
        let monitor = Arc::new(ResourceMonitor {
            memory_high_watermark: AtomicU64::new(memory_high_watermark),
            disk_free_limit: AtomicU64::new(disk_free_limit),
            data_dir,
            alarm,
        });
        monitor.check();
        monitor
    }

    /// Follows the alarm: `Some(reason)` while it is on.
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.alarm.subscribe()
    }

    /// Changes the limits (None keeps one) and re-evaluates at once.
    pub fn set_limits(&self, memory_high_watermark: Option<u64>, disk_free_limit: Option<u64>) {
        if let Some(m) = memory_high_watermark {
            self.memory_high_watermark.store(m, Ordering::Release);
        }
        if let Some(d) = disk_free_limit {
            self.disk_free_limit.store(d, Ordering::Release);
        }
        self.check();
    }

    pub fn report(&self) -> ResourceReport {
        ResourceReport {
            memory_high_watermark: self.memory_high_watermark.load(Ordering::Acquire),
            disk_free_limit: self.disk_free_limit.load(Ordering::Acquire),
            memory_used: resident_memory(),
            disk_free: disk_free(&self.data_dir),
            alarm: self.alarm.borrow().clone(),
        }
    }

    /// Reads the figures and turns the alarm on or off.
    pub fn check(&self) {
        let r = self.report();
        let memory = r.memory_high_watermark != 0
            && r.memory_used
                .is_some_and(|used| used > r.memory_high_watermark);
        let disk =
            r.disk_free_limit != 0 && r.disk_free.is_some_and(|free| free < r.disk_free_limit);
        let reason = match (memory, disk) {
            (false, false) => None,
            (true, false) => Some("low on memory".to_owned()),
            (false, true) => Some("low on disk".to_owned()),
            (true, true) => Some("low on memory and disk".to_owned()),
        };
        self.alarm.send_if_modified(|current| {
            if *current == reason {
                return false;
            }
            match &reason {
                Some(why) => warn!(
                    reason = %why,
                    memory_used = ?r.memory_used,
                    memory_high_watermark = r.memory_high_watermark,
                    disk_free = ?r.disk_free,
                    disk_free_limit = r.disk_free_limit,
                    "resource alarm: publishers are blocked"
                ),
                None => warn!("resource alarm cleared: publishers may go on"),
            }
            *current = reason.clone();
            true
        });
    }

    /// Checks every second for as long as the monitor is in use.
    pub async fn run(monitor: std::sync::Weak<ResourceMonitor>) {
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(m) = monitor.upgrade() else { return };
            m.check();
        }
    }
}

/// The process's resident set, from `/proc/self/statm`.
pub fn resident_memory() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// The machine's memory, from `/proc/meminfo`, for the default high watermark.
pub fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Space available to unprivileged writers on the file system holding `path`.
pub fn disk_free(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alarm_follows_the_limits() {
        let dir = std::env::temp_dir();
        let m = ResourceMonitor::new(dir, 0, 0);
        let mut rx = m.subscribe();
        assert_eq!(*rx.borrow_and_update(), None);
        // More free space than any disk has: the disk alarm goes on.
        m.set_limits(None, Some(u64::MAX));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().as_deref(), Some("low on disk"));
        // A watermark below what the process uses: memory too.
        m.set_limits(Some(1), None);
        assert_eq!(
            rx.borrow_and_update().as_deref(),
            Some("low on memory and disk")
        );
        m.set_limits(Some(0), Some(0));
        assert_eq!(*rx.borrow_and_update(), None);
        let r = m.report();
        assert!(r.memory_used.is_some_and(|u| u > 0));
        assert!(r.disk_free.is_some());
        assert!(total_memory().is_some_and(|t| t > 0));
    }
}
