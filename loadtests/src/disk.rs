//! The disk's flush latency during a run, beside the database: every
//! acknowledged bid waits for a WAL flush, so a slow `fdatasync` holds
//! every bid committing at that moment. One 8 kB write and flush every
//! 10 ms; the slowest of each second is kept, for the report to set beside
//! the bids' latency.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::probe::ProbeThread;

/// Time between two probe flushes.
const EVERY: Duration = Duration::from_millis(10);
/// A flush slower than this is a stall.
pub const STALL_MS: f64 = 50.0;

/// The probe's flushes within one second of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskSecond {
    /// Flushes that ended in this second.
    pub flushes: u32,
    /// The slowest of them, in milliseconds.
    pub max_ms: f64,
}

/// Flush latency per second of a run, as far as it has been measured.
#[derive(Debug, Clone, Default)]
pub struct DiskSeconds(Arc<Mutex<Vec<DiskSecond>>>);

impl DiskSeconds {
    /// The slowest flush in seconds `from..to`, if any was measured.
    pub fn max_ms(&self, from: usize, to: usize) -> Option<f64> {
        let seconds = self.0.lock().expect("disk seconds");
        let end = to.min(seconds.len());
        seconds
            .get(from.min(end)..end)?
            .iter()
            .filter(|s| s.flushes > 0)
            .map(|s| s.max_ms)
            .reduce(f64::max)
    }

    /// Every second measured so far.
    pub fn snapshot(&self) -> Vec<DiskSecond> {
        self.0.lock().expect("disk seconds").clone()
    }

    fn record(&self, second: usize, latency_ms: f64) {
        let mut seconds = self.0.lock().expect("disk seconds");
        if seconds.len() <= second {
            seconds.resize(second + 1, DiskSecond::default());
        }
        let s = &mut seconds[second];
        s.flushes += 1;
        s.max_ms = s.max_ms.max(latency_ms);
    }
}

/// A running probe; [`DiskProbe::stop`] ends it.
pub struct DiskProbe {
    seconds: DiskSeconds,
    thread: ProbeThread,
    path: PathBuf,
}

impl DiskProbe {
    /// Starts probing the filesystem of `dir`; second 0 starts at `t0`
    /// (flushes before it are not kept).
    pub fn start(dir: &Path, t0: Instant) -> anyhow::Result<Self> {
        let path = dir.join("flush-probe");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating the disk probe's file {}", path.display()))?;
        let seconds = DiskSeconds::default();
        let thread = ProbeThread::spawn("disk probe", {
            let seconds = seconds.clone();
            move |stop| probe(&file, t0, &seconds, stop)
        })?;
        Ok(DiskProbe {
            seconds,
            thread,
            path,
        })
    }

    /// What it has measured so far (shared with the probe).
    pub fn seconds(&self) -> DiskSeconds {
        self.seconds.clone()
    }

    /// Stops the probe and returns every second it measured.
    pub fn stop(mut self) -> Vec<DiskSecond> {
        self.halt();
        self.seconds.snapshot()
    }

    fn halt(&mut self) {
        if self.thread.halt() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for DiskProbe {
    fn drop(&mut self) {
        self.halt();
    }
}

fn probe(file: &File, t0: Instant, seconds: &DiskSeconds, stop: &AtomicBool) {
    let block = [0x5a_u8; 8192];
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let flushed = file.write_all_at(&block, 0).and_then(|()| file.sync_data());
        if flushed.is_err() {
            // A disk that cannot take 8 kB fails the database too: the
            // run shows that on its own.
            return;
        }
        let ended = Instant::now();
        if let Some(since) = ended.checked_duration_since(t0) {
            let latency_ms = (ended - started).as_secs_f64() * 1000.0;
            seconds.record(since.as_secs() as usize, latency_ms);
        }
        std::thread::sleep(EVERY.saturating_sub(ended - started));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_flushes_about_a_hundred_times_a_second_and_keeps_the_slowest() {
        let dir = std::env::temp_dir().join(format!("disk-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let probe = DiskProbe::start(&dir, Instant::now()).unwrap();
        std::thread::sleep(Duration::from_millis(1_300));
        let live = probe.seconds();
        let seconds = probe.stop();
        assert!(!dir.join("flush-probe").exists(), "the probe cleans up");
        std::fs::remove_dir_all(&dir).unwrap();
        let first = seconds[0];
        assert!(
            (20..=101).contains(&first.flushes),
            "flushes in the first second: {}",
            first.flushes
        );
        assert!(first.max_ms > 0.0);
        assert_eq!(live.max_ms(0, 1), Some(first.max_ms));
        assert_eq!(live.max_ms(5, 9), None, "seconds not measured");
    }

    #[test]
    fn the_slowest_flush_of_a_window_is_its_maximum() {
        let seconds = DiskSeconds::default();
        seconds.record(0, 1.5);
        seconds.record(0, 0.5);
        seconds.record(2, 120.0);
        seconds.record(3, 4.0);
        assert_eq!(seconds.max_ms(0, 2), Some(1.5), "second 1 had no flush");
        assert_eq!(seconds.max_ms(0, 4), Some(120.0));
        assert_eq!(seconds.max_ms(3, 10), Some(4.0));
        assert_eq!(seconds.snapshot()[1], DiskSecond::default());
    }
}
