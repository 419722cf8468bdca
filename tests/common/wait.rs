//! Waiting on observable state instead of sleeping: one helper for async
//! tests, one for blocking code (process start-up, `#[test]` functions).
//! Both poll every 10 ms and panic, naming what they waited for, once
//! `within` has passed.

use std::time::{Duration, Instant};

/// How long a server may take to start, or a thing that just has to
/// happen to happen, on a busy 2-core machine.
pub const STARTUP: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(10);

/// Polls `ready` until it holds; returns how long that took.
pub async fn wait_until(
    what: &str,
    within: Duration,
    mut ready: impl AsyncFnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !ready().await {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(POLL).await;
    }
    start.elapsed()
}

/// [`wait_until`] for code without a runtime: blocks the thread.
pub fn wait_until_blocking(
    what: &str,
    within: Duration,
    mut ready: impl FnMut() -> bool,
) -> Duration {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(POLL);
    }
    start.elapsed()
}
