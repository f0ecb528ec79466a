//! The load's own runtime, at a lower scheduling priority than the service
//! it measures: on a shared machine an overloaded generator at equal
//! priority takes the cores the database needs to commit the bids it sends.
//! Latency still runs from each request's intended send time, so a request
//! sent late counts against the service. Linux keeps a nice value per
//! thread, so only this runtime's threads are lowered.

use std::io;

use anyhow::Context as _;

/// Sets the calling thread's nice value (raising it needs no privilege).
pub fn set_this_thread_nice(nice: i32) -> io::Result<()> {
    // setpriority(2) for "this process" sets the calling thread, on Linux.
    Ok(rustix::process::setpriority_process(None, nice)?)
}

/// The calling thread's nice value.
pub fn this_thread_nice() -> io::Result<i32> {
    // getpriority(2) for "this process" reads the calling thread, on Linux.
    Ok(rustix::process::getpriority_process(None)?)
}

/// A multi-threaded runtime whose every thread (workers and blocking
/// threads) runs `nice` steps below the thread that builds it.
pub struct LoweredRuntime(Option<tokio::runtime::Runtime>);

impl LoweredRuntime {
    /// Starts the runtime's threads.
    pub fn start(nice: i32) -> anyhow::Result<Self> {
        ensure_valid(nice)?;
        // A value, not a step: a blocking thread is started from a worker
        // whose value it inherits.
        let value = (this_thread_nice()? + nice).min(19);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("gavel-load")
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = set_this_thread_nice(value) {
                    eprintln!("(a load thread keeps its priority: nice {value} failed: {e})");
                }
            })
            .build()
            .context("starting the load's runtime")?;
        Ok(LoweredRuntime(Some(runtime)))
    }

    /// Runs `task` on the runtime.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.as_ref().expect("running").spawn(task)
    }

    /// Stops the runtime and waits until its threads have dropped every
    /// task (and what the tasks held).
    pub async fn stop(mut self) {
        if let Some(runtime) = self.0.take() {
            // Dropping a runtime blocks: not on an async worker.
            let _ = tokio::task::spawn_blocking(move || drop(runtime)).await;
        }
    }
}

impl Drop for LoweredRuntime {
    /// Not stopped (an error ended the run early): stop without waiting,
    /// which may be done from async code.
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Checks a `--generator-nice` value: 0 to 19 steps.
pub fn ensure_valid(nice: i32) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0..=19).contains(&nice),
        "--generator-nice must be 0 to 19 (the steps the load runs below Gavel and PostgreSQL), not {nice}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_load_runtime_runs_lower_and_leaves_the_builder_alone() {
        let before = this_thread_nice().unwrap();
        let outer = tokio::runtime::Runtime::new().unwrap();
        let (on_worker, on_blocking) = outer.block_on(async {
            let load = LoweredRuntime::start(5).unwrap();
            let on_worker = load.spawn(async { this_thread_nice() }).await;
            let on_blocking = load
                .spawn(async { tokio::task::spawn_blocking(this_thread_nice).await })
                .await;
            load.stop().await;
            (
                on_worker.unwrap().unwrap(),
                on_blocking.unwrap().unwrap().unwrap(),
            )
        });
        assert_eq!(on_worker, (before + 5).min(19));
        assert_eq!(on_blocking, (before + 5).min(19));
        assert_eq!(this_thread_nice().unwrap(), before);
        // A thread started from the builder's thread keeps its priority.
        let sibling = std::thread::spawn(this_thread_nice)
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(sibling, before);
    }

    #[test]
    fn out_of_range_values_are_refused() {
        assert!(ensure_valid(0).is_ok());
        assert!(ensure_valid(19).is_ok());
        let message = ensure_valid(20).unwrap_err().to_string();
        assert!(message.contains("0 to 19"), "{message}");
        assert!(ensure_valid(-1).is_err());
    }
}
