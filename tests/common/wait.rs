//! Waiting on observable state instead of sleeping: one helper for async
//! tests, one for blocking code (process start-up, `#[test]` functions).
//! Both poll every 10 ms and panic, naming what they waited for and where,
//! once `within` has passed; both return how long the wait took.

use std::panic::Location;
use std::time::{Duration, Instant};

/// The bound for waits whose timing is not under test: ample for a
/// server's start-up or a reload on a busy 2-core machine.
pub const SOON: Duration = Duration::from_secs(10);

const POLL: Duration = Duration::from_millis(10);

/// Polls `ready` until it holds.
#[track_caller]
pub fn wait_until(
    what: &str,
    within: Duration,
    mut ready: impl AsyncFnMut() -> bool,
) -> impl Future<Output = Duration> {
    let at = Location::caller();
    async move {
        let start = Instant::now();
        while !ready().await {
            assert!(
                start.elapsed() < within,
                "{at}: timed out after {within:?} waiting for {what}"
            );
            tokio::time::sleep(POLL).await;
        }
        start.elapsed()
    }
}

/// [`wait_until`] for code without a runtime: blocks the thread.
#[track_caller]
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
