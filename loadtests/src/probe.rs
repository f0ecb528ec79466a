//! The thread a probe runs on ([`crate::disk`], [`crate::cpu`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context as _;

/// A probe's thread, told to stop and joined once: by [`ProbeThread::halt`]
/// or when dropped.
pub(crate) struct ProbeThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ProbeThread {
    /// Runs `body` on a thread named `name`; `body` returns once the flag
    /// it is given is set.
    pub(crate) fn spawn(
        name: &str,
        body: impl FnOnce(&AtomicBool) + Send + 'static,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn({
                let stop = stop.clone();
                move || body(&stop)
            })
            .with_context(|| format!("starting the {name}"))?;
        Ok(ProbeThread {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it; true the first time only.
    pub(crate) fn halt(&mut self) -> bool {
        let Some(thread) = self.thread.take() else {
            return false;
        };
        self.stop.store(true, Ordering::Release);
        let _ = thread.join();
        true
    }
}

impl Drop for ProbeThread {
    fn drop(&mut self) {
        self.halt();
    }
}
