//! The math of each rule kind, pure and clock-free.
//!
//! `lua/limiter.lua` implements exactly the same arithmetic, in the same
//! order, so the Redis and memory backends agree to the microsecond; the
//! golden tables in `tests/vectors/` hold both to it. Times are integer
//! microseconds since the Unix epoch. All integer intermediates stay below
//! 2^52 (config validation bounds them), where Lua's doubles are exact.

use super::RuleKind;

/// One rule's stored state for one key:
/// token bucket `[tat, 0, 0]`, fixed window `[window, count, 0]`,
/// sliding window `[window, current, previous]`; a concurrency rule's is
/// read from its leases, not stored: `[leases outstanding, soonest expiry,
/// latest expiry]` (expiries absolute, 0 without leases).
pub type State = [u64; 3];

/// Kept this long past the moment a state stops mattering, so a state is
/// never dropped while it still matters (Redis expiry uses its own clock).
pub const EXPIRY_MARGIN_US: u64 = 1_000_000;

/// One rule's verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eval {
    pub allowed: bool,
    /// Units left after this request (units available now, if denied).
    pub remaining: u64,
    /// Time until the rule is back to its full limit.
    pub reset_us: u64,
    /// When denied: time until this request's cost would fit. 0 if allowed.
    pub retry_us: u64,
    /// The state to store if the whole policy allows and the cost is > 0.
    pub next: State,
    /// When the stored state stops mattering (absolute, without margin).
    pub expires_us: u64,
}

/// Evaluates one rule. `cost` 0 is a peek: it is decided as a cost of 1
/// ("would one unit pass?") and charges nothing.
pub fn eval(kind: RuleKind, state: Option<State>, now: u64, cost: u64) -> Eval {
    match kind {
        RuleKind::TokenBucket {
            capacity,
            interval_us,
        } => token_bucket(capacity, interval_us, state, now, cost),
        RuleKind::FixedWindow { limit, window_us } => {
            fixed_window(limit, window_us, state, now, cost)
        }
        RuleKind::SlidingWindow { limit, window_us } => {
            sliding_window(limit, window_us, state, now, cost)
        }
        RuleKind::Concurrency { limit, lease_us } => concurrency(limit, lease_us, state, now, cost),
    }
}

/// Leases outstanding (expired ones already dropped by the backend): one
/// more fits while fewer than `limit` are out, whatever the cost, and an
/// allowed check of cost > 0 takes it until `now + lease_us`. Denied, the
/// retry is the soonest expiry (a release can free a slot sooner).
fn concurrency(limit: u64, lease_us: u64, state: Option<State>, now: u64, cost: u64) -> Eval {
    let [count, soonest, latest] = state.unwrap_or([0, 0, 0]);
    let left = |t: u64| t.saturating_sub(now);
    if count < limit {
        let take = u64::from(cost > 0);
        let until = if take == 1 {
            latest.max(now + lease_us)
        } else {
            latest
        };
        Eval {
            allowed: true,
            remaining: limit - count - take,
            reset_us: left(until),
            retry_us: 0,
            next: [count + take, soonest, until],
            expires_us: until,
        }
    } else {
        Eval {
            allowed: false,
            remaining: 0,
            reset_us: left(latest),
            retry_us: left(soonest).max(1),
            next: [count, soonest, latest],
            expires_us: latest,
        }
    }
}

/// One rule's usage without charging: `(remaining, reset_us)`. A peek's
/// numbers, except that a fixed window (a daily quota too) always resets
/// at its window's end (the next 00:00 UTC for a daily quota), used or
/// not. `lua/limiter.lua`'s `usage` mirrors it.
pub fn usage(kind: RuleKind, state: Option<State>, now: u64) -> (u64, u64) {
    let e = eval(kind, state, now, 0);
    let reset_us = match kind {
        RuleKind::FixedWindow { window_us, .. } => (now / window_us + 1) * window_us - now,
        _ => e.reset_us,
    };
    (e.remaining, reset_us)
}

/// GCRA: the state's `tat` is when the bucket would be full again; one
/// unit comes back every `t` µs.
fn token_bucket(capacity: u64, t: u64, state: Option<State>, now: u64, cost: u64) -> Eval {
    let c1 = cost.max(1);
    let ct = capacity * t;
    let tat = state.map_or(0, |s| s[0]).max(now);
    let used = (tat - now).min(ct);
    let avail = (ct - used) / t;
    if avail >= c1 {
        let next_tat = tat + cost * t;
        Eval {
            allowed: true,
            remaining: avail - cost,
            reset_us: next_tat - now,
            retry_us: 0,
            next: [next_tat, 0, 0],
            expires_us: next_tat,
        }
    } else {
        Eval {
            allowed: false,
            remaining: avail,
            reset_us: tat - now,
            retry_us: used + c1 * t - ct,
            next: [tat, 0, 0],
            expires_us: tat,
        }
    }
}

/// A count per aligned window of `w` µs.
fn fixed_window(limit: u64, w: u64, state: Option<State>, now: u64, cost: u64) -> Eval {
    let c1 = cost.max(1);
    let win = now / w;
    let end = (win + 1) * w;
    let count = match state {
        Some([sw, n, _]) if sw == win => n,
        _ => 0,
    };
    if count + c1 <= limit {
        let used = count + cost;
        Eval {
            allowed: true,
            remaining: limit - used,
            reset_us: if used > 0 { end - now } else { 0 },
            retry_us: 0,
            next: [win, used, 0],
            expires_us: end,
        }
    } else {
        Eval {
            allowed: false,
            remaining: limit.saturating_sub(count),
            reset_us: if count > 0 { end - now } else { 0 },
            retry_us: end - now,
            next: [win, count, 0],
            expires_us: end,
        }
    }
}

/// This aligned window's count plus the previous one's, weighted by how
/// much of it the sliding window still covers.
fn sliding_window(limit: u64, w: u64, state: Option<State>, now: u64, cost: u64) -> Eval {
    let c1 = cost.max(1);
    let win = now / w;
    let start = win * w;
    let e = now - start;
    let (cur, prev) = match state {
        Some([sw, c, p]) if sw == win => (c, p),
        Some([sw, c, _]) if sw + 1 == win => (0, c),
        _ => (0, 0),
    };
    let avail = sliding_avail(limit, w, cur, prev, e);
    let allowed = avail >= c1;
    let used = if allowed { cur + cost } else { cur };
    let reset_us = if used > 0 {
        start + 2 * w - now
    } else if prev > 0 {
        start + w - now
    } else {
        0
    };
    let retry_us = if allowed {
        0
    } else {
        sliding_retry(limit, w, cur, prev, e, c1)
    };
    Eval {
        allowed,
        remaining: if allowed { avail - cost } else { avail },
        reset_us,
        retry_us,
        next: [win, used, prev],
        expires_us: start + 2 * w,
    }
}

/// Whole units available in a sliding window: `floor(limit - estimate)`,
/// where the previous window's count is weighted by how much of it still
/// overlaps the sliding window.
fn sliding_avail(limit: u64, w: u64, cur: u64, prev: u64, e: u64) -> u64 {
    let estimate = prev as f64 * (w - e) as f64 / w as f64 + cur as f64;
    let avail = (limit as f64 - estimate).floor();
    if avail > 0.0 { avail as u64 } else { 0 }
}

/// Time until `c1` units fit in a sliding window, found analytically and
/// then confirmed with [`sliding_avail`] itself, so waiting that long is
/// always enough, whatever the floating-point rounding.
fn sliding_retry(limit: u64, w: u64, cur: u64, prev: u64, e: u64, c1: u64) -> u64 {
    let wf = w as f64;
    if cur + c1 <= limit {
        // Fits later in this window, as the previous window's weight decays.
        let need = wf - (limit - cur - c1) as f64 * wf / prev as f64;
        let mut at = (need.ceil() as u64).max(e + 1);
        for _ in 0..4 {
            if at >= w || sliding_avail(limit, w, cur, prev, at) >= c1 {
                break;
            }
            at += 1;
        }
        at.min(w) - e
    } else {
        // Fits only in the next window, where this window's count decays.
        let need = wf - (limit - c1) as f64 * wf / cur as f64;
        let mut at = if need > 0.0 { need.ceil() as u64 } else { 0 };
        for _ in 0..4 {
            if at >= w || sliding_avail(limit, w, 0, cur, at) >= c1 {
                break;
            }
            at += 1;
        }
        w - e + at.min(w)
    }
}

/// Microseconds to whole milliseconds, rounded up: a client that waits the
/// rounded time never comes back early.
pub fn ceil_ms(us: u64) -> u64 {
    us.div_ceil(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000;
    const T0: u64 = 1_700_000_000 * S;

    fn tb(capacity: u64, per_sec: u64) -> RuleKind {
        RuleKind::TokenBucket {
            capacity,
            interval_us: S / per_sec,
        }
    }

    /// Applies `cost` at `now` and returns the verdict and the new state.
    fn step(kind: RuleKind, state: &mut Option<State>, now: u64, cost: u64) -> Eval {
        let ev = eval(kind, *state, now, cost);
        if ev.allowed && cost > 0 {
            *state = Some(ev.next);
        }
        ev
    }

    #[test]
    fn token_bucket_allows_capacity_then_refills_one_per_interval() {
        let k = tb(3, 2);
        let mut s = None;
        for left in [2, 1, 0] {
            assert_eq!(step(k, &mut s, T0, 1).remaining, left);
        }
        let denied = step(k, &mut s, T0, 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_us, S / 2);
        assert!(step(k, &mut s, T0 + S / 2, 1).allowed);
        assert!(!step(k, &mut s, T0 + S / 2, 1).allowed);
    }

    #[test]
    fn peek_reports_without_charging() {
        let k = tb(2, 1);
        let mut s = None;
        let p = step(k, &mut s, T0, 0);
        assert!(p.allowed);
        assert_eq!(p.remaining, 2);
        assert!(s.is_none());
    }

    /// For every algorithm and many states: a denied request retried after
    /// exactly `retry_us` (nothing else consumed) is allowed.
    #[test]
    fn retry_after_is_always_enough_and_never_early_by_a_whole_ms() {
        let kinds = [
            tb(7, 3),
            RuleKind::FixedWindow {
                limit: 5,
                window_us: 1_500_000,
            },
            RuleKind::SlidingWindow {
                limit: 7,
                window_us: 1_000_000,
            },
            RuleKind::SlidingWindow {
                limit: 100,
                window_us: 60_000_000,
            },
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for kind in kinds {
            let mut s = None;
            let mut now = T0;
            for _ in 0..20_000 {
                now += rand(300_000);
                let cost = 1 + rand(3);
                let ev = step(kind, &mut s, now, cost);
                if !ev.allowed {
                    let at = now + ev.retry_us;
                    assert!(eval(kind, s, at, cost).allowed, "{kind:?} {s:?} {now}");
                    if ev.retry_us >= 1000 {
                        let early = eval(kind, s, at - 1000, cost);
                        assert!(!early.allowed, "{kind:?}: retry overstated by a whole ms");
                    }
                }
            }
        }
    }

    #[test]
    fn concurrency_counts_leases_not_cost() {
        let k = RuleKind::Concurrency {
            limit: 2,
            lease_us: 5 * S,
        };
        let first = eval(k, None, T0, 7);
        assert!(first.allowed);
        assert_eq!((first.remaining, first.reset_us), (1, 5 * S));
        let peek = eval(k, Some([1, T0 + 5 * S, T0 + 5 * S]), T0 + S, 0);
        assert_eq!(
            (peek.allowed, peek.remaining, peek.reset_us),
            (true, 1, 4 * S)
        );
        let full = eval(k, Some([2, T0 + 5 * S, T0 + 6 * S]), T0 + S, 1);
        assert!(!full.allowed);
        assert_eq!(
            (full.remaining, full.retry_us, full.reset_us),
            (0, 4 * S, 5 * S)
        );
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let k = RuleKind::SlidingWindow {
            limit: 10,
            window_us: S,
        };
        let start = T0; // T0 is a whole second: a window edge
        let mut s = None;
        for _ in 0..10 {
            assert!(step(k, &mut s, start + S / 2, 1).allowed);
        }
        // Half way into the next window, half of the 10 still count.
        let ev = step(k, &mut s, start + S + S / 2, 1);
        assert!(ev.allowed);
        assert_eq!(ev.remaining, 4);
    }
}
