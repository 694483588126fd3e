//! Outbound webhooks: `deployment.completed` and `deployment.failed`, delivered to the
//! configured endpoints (`webhooks.endpoints`) and to a request's `callback_url`, signed the way
//! the ML platform signs its DeltaOne webhooks, at least once, with the same id and body on
//! every attempt (docs/webhooks.md).
//!
//! A delivery is a job in Redis, queued in the same `MULTI` that publishes the event and acks
//! the message (or dead-letters it), so an event exists exactly when its deliveries do. Jobs
//! move like messages: ready list → the worker's processing list (`BLMOVE`) → gone on a 2xx,
//! or to the retry schedule (a sorted set by due time), or to the webhook dead-letter list. A
//! worker SIGKILLed mid-delivery leaves its job in its processing list; its restart (or the
//! reaper, once its heartbeat expires) puts it back, and it is sent again unchanged.
//!
//! - [`events`]: the event bodies, their ids, and the jobs one event makes ([`Outbox`]).
//! - [`sign`]: the `X-Hokusai-*` signature headers.
//! - [`target`]: where a delivery may go: HTTPS, and no loopback, private, link-local or
//!   metadata address unless `webhooks.allow_hosts` names the host (SSRF), checked when a
//!   callback is accepted and again at every connection.
//! - [`store`]: the jobs' Redis lists and the operator's `webhooks` commands.
//! - [`delivery`]: the workers' delivery loop: send, sort the answer, retry with backoff.

pub mod delivery;
pub mod events;
pub mod sign;
pub mod store;
pub mod target;

pub use events::{Job, Outbox};
pub use store::{Keys, Store};
