//! Where "now" comes from.
//!
//! In production the Redis backend takes the time from Redis `TIME` (one
//! clock for every sidecar) and the memory backend from the system clock.
//! Tests drive a [`Clock::Manual`] to cross window edges and UTC midnight
//! without waiting; the Redis backend then passes that time to its script.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, from the system or from a test.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The real clock (Redis `TIME` for the Redis backend).
    #[default]
    System,
    /// A clock that only moves when a test moves it.
    Manual(Arc<AtomicU64>),
}

impl Clock {
    pub fn manual(start_us: u64) -> Self {
        Clock::Manual(Arc::new(AtomicU64::new(start_us)))
    }

    /// The current time in microseconds since the Unix epoch.
    pub fn now_us(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            Clock::Manual(t) => t.load(Ordering::Relaxed),
        }
    }

    /// The time a backend must use instead of its own clock, if any.
    pub fn fixed_us(&self) -> Option<u64> {
        match self {
            Clock::System => None,
            Clock::Manual(t) => Some(t.load(Ordering::Relaxed)),
        }
    }

    /// Sets a manual clock (no effect on the system clock).
    pub fn set_us(&self, us: u64) {
        if let Clock::Manual(t) = self {
            t.store(us, Ordering::Relaxed);
        }
    }
}
