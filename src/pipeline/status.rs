//! What the ops server shows of a running worker; the worker updates it as it goes.

use std::sync::atomic::Ordering;

/// What the ops server shows of a running worker; the worker updates it as it goes.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    phase: std::sync::Mutex<&'static str>,
    pub(super) paused: std::sync::atomic::AtomicBool,
    /// Held back: the outbound queue is over `queues.outbound_max_len`.
    pub(super) backpressure: std::sync::atomic::AtomicBool,
    pub(super) in_flight: std::sync::atomic::AtomicUsize,
    fee_waiting: std::sync::atomic::AtomicUsize,
    pub(super) worker_id: std::sync::OnceLock<String>,
    pub(super) signer: std::sync::OnceLock<String>,
    /// The circuit breaker on chain operations (open: no RPC URL answers).
    pub breaker: crate::chain::Breaker,
    /// Why the worker takes no message for want of funds (`None`: it can pay).
    unfunded: std::sync::Mutex<Option<String>>,
    /// The Redis primary in use and the replica acks of the last write that waited for them.
    pub topology: std::sync::Arc<crate::topology::Topology>,
}

impl WorkerStatus {
    /// `starting`, `waiting_for_key`, `connecting_chain`, `running`, `draining` or `stopped`.
    pub fn phase(&self) -> &'static str {
        let p = *self.phase.lock().expect("never poisoned");
        if p.is_empty() {
            "starting"
        } else {
            p
        }
    }
    pub(super) fn set_phase(&self, p: &'static str) {
        *self.phase.lock().expect("never poisoned") = p;
    }
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
    /// Taking nothing because the website's queue is full.
    pub fn backpressure(&self) -> bool {
        self.backpressure.load(Ordering::Relaxed)
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
    /// Messages held back because fees are above the cap.
    pub fn waiting_for_fees(&self) -> usize {
        self.fee_waiting.load(Ordering::Relaxed)
    }
    /// The reason the signer cannot pay for a deployment, if it cannot.
    pub fn unfunded(&self) -> Option<String> {
        self.unfunded.lock().expect("never poisoned").clone()
    }
    /// Records the funding check; true when it changed.
    pub(super) fn set_unfunded(&self, why: Option<String>) -> bool {
        let mut u = self.unfunded.lock().expect("never poisoned");
        let changed = u.is_some() != why.is_some();
        *u = why;
        changed
    }
    pub fn worker_id(&self) -> &str {
        self.worker_id.get().map(String::as_str).unwrap_or("")
    }
    pub fn signer(&self) -> Option<&str> {
        self.signer.get().map(String::as_str)
    }
}

/// Counts a message in [`WorkerStatus::waiting_for_fees`] while its last attempt found fees
/// above the cap, and no longer once it ends whichever way.
pub(super) struct FeeWait<'a> {
    status: &'a WorkerStatus,
    counted: bool,
}

impl<'a> FeeWait<'a> {
    pub(super) fn new(status: &'a WorkerStatus) -> Self {
        FeeWait {
            status,
            counted: false,
        }
    }

    pub(super) fn set(&mut self, waiting: bool) {
        if waiting != self.counted {
            if waiting {
                self.status.fee_waiting.fetch_add(1, Ordering::Relaxed);
            } else {
                self.status.fee_waiting.fetch_sub(1, Ordering::Relaxed);
            }
            self.counted = waiting;
        }
    }
}

impl Drop for FeeWait<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}
