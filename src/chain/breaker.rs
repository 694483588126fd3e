//! The circuit breaker on chain operations: after `chain.breaker.failures` attempts in a row
//! failed because no RPC URL answered, the worker stops taking messages and in-flight messages
//! wait instead of spending their retries; after `chain.breaker.cool_down_secs` one probe
//! (half-open) decides whether it closes or stays open for another cool-down.
//!
//! It only keeps the state; the worker probes, records transitions in the audit and metric.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The breaker's state, also the value of `hokusai_chain_breaker_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    fn from_u8(v: u8) -> BreakerState {
        match v {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }
}

/// Shared by a worker's jobs and its ops server. `failures = 0` turns it off.
#[derive(Debug, Default)]
pub struct Breaker {
    threshold: AtomicU32,
    cool_down_ms: std::sync::atomic::AtomicU64,
    state: AtomicU8,
    consecutive: AtomicU32,
    opened_at: Mutex<Option<Instant>>,
}

impl Breaker {
    /// Sets the threshold and cool-down (from `chain.breaker`); until then it never opens.
    pub fn configure(&self, failures: u32, cool_down: Duration) {
        self.threshold.store(failures, Ordering::Relaxed);
        self.cool_down_ms
            .store(cool_down.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether the worker should hold back: open or probing.
    pub fn is_open(&self) -> bool {
        self.state() != BreakerState::Closed
    }

    /// Consecutive failures counted so far.
    pub fn failures(&self) -> u32 {
        self.consecutive.load(Ordering::Relaxed)
    }

    pub fn cool_down(&self) -> Duration {
        Duration::from_millis(self.cool_down_ms.load(Ordering::Relaxed))
    }

    /// An attempt reached the chain: the count starts over. Returns the transition, if any
    /// (a success seen while open closes it: the RPC is back).
    pub fn success(&self) -> Option<BreakerState> {
        self.consecutive.store(0, Ordering::Relaxed);
        self.set(BreakerState::Closed)
    }

    /// An attempt failed because no RPC URL answered. Returns `Some(Open)` when this failure
    /// opens the breaker.
    pub fn failure(&self) -> Option<BreakerState> {
        let threshold = self.threshold.load(Ordering::Relaxed);
        let n = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        if threshold == 0 || n < threshold || self.is_open() {
            return None;
        }
        self.open()
    }

    /// When open and the cool-down has passed, moves to half-open and returns true: the
    /// caller runs the one probe and reports it with [`Breaker::probed`].
    pub fn try_half_open(&self) -> bool {
        if self.state() != BreakerState::Open {
            return false;
        }
        let due = self
            .opened_at
            .lock()
            .expect("never poisoned")
            .is_some_and(|at| at.elapsed() >= self.cool_down());
        due && self
            .state
            .compare_exchange(
                BreakerState::Open as u8,
                BreakerState::HalfOpen as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The half-open probe's result: closes, or opens for another cool-down.
    pub fn probed(&self, ok: bool) -> Option<BreakerState> {
        if ok {
            self.success()
        } else {
            self.open()
        }
    }

    fn open(&self) -> Option<BreakerState> {
        *self.opened_at.lock().expect("never poisoned") = Some(Instant::now());
        self.set(BreakerState::Open)
    }

    fn set(&self, to: BreakerState) -> Option<BreakerState> {
        let from = self.state.swap(to as u8, Ordering::AcqRel);
        (from != to as u8).then_some(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_closes_after_a_good_probe() {
        let b = Breaker::default();
        b.configure(3, Duration::ZERO);
        assert_eq!(b.failure(), None);
        assert_eq!(b.failure(), None);
        assert_eq!(b.failure(), Some(BreakerState::Open));
        assert!(b.is_open());
        // Further failures while open change nothing.
        assert_eq!(b.failure(), None);
        assert!(b.try_half_open());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.try_half_open(), "one probe at a time");
        assert_eq!(b.probed(false), Some(BreakerState::Open));
        assert!(b.try_half_open());
        assert_eq!(b.probed(true), Some(BreakerState::Closed));
        assert_eq!(b.failures(), 0);
    }

    #[test]
    fn a_success_resets_the_count_and_zero_turns_it_off() {
        let b = Breaker::default();
        b.configure(2, Duration::from_secs(60));
        b.failure();
        b.success();
        assert_eq!(b.failure(), None);
        assert!(!b.try_half_open());
        let off = Breaker::default();
        off.configure(0, Duration::ZERO);
        for _ in 0..100 {
            assert_eq!(off.failure(), None);
        }
        assert!(!off.is_open());
    }
}
