//! `GET /api/deployments/{id}/events`: a deployment's progress as Server-Sent Events, for the
//! browser. The same caller, limit and answer as `GET /api/deployments/{id}/status` (both go
//! through [`status::authorized`]); then the current status at once, every later transition
//! (`pending`, `deploying`, `completed` or `failed`), each with the status endpoint's JSON body,
//! and the end of the stream right after `completed` or `failed`.
//!
//! Any API process serves any deployment: workers publish on Redis Pub/Sub
//! ([`queue::progress_channel`]) the model id when its transaction or event is journaled and
//! the message id (= deployment id) when it is dead-lettered. Each process has one subscriber
//! connection ([`Notifications`]) and fans what it hears out to its streams, which re-read their
//! status when their deployment id or model id comes by, and every `api.events_recheck_secs`
//! anyway: a notification lost (Redis restarting, a slow stream) costs at most that long.
//!
//! An event's id is the status's rank: 1 `pending`, 2 `deploying`, 3 `completed` or `failed`.
//! A status is sent only when its rank is above the last one sent, or on a reconnection above
//! the client's `Last-Event-ID` (or the `lastEventId` query parameter, which
//! `event-source-polyfill` sends instead). A reconnection to a deployment that has ended, with
//! its terminal id 3, is answered `204 No Content`, which tells `EventSource` to stop
//! reconnecting.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Builder;
use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::authorization::ClientIp;
use super::errors::{ApiError, ErrorResponse, Request};
use super::status::{self, DeploymentStatusResponse};
use super::ApiState;
use crate::queue;

/// The route, as matched.
pub const ROUTE: &str = "/api/deployments/{id}/events";

/// Messages a process's fan-out holds for a stream that has not read them yet; a stream that
/// falls further behind re-reads its status (it may have missed its own).
const FAN_OUT: usize = 1024;

/// The rank of the terminal statuses (`completed`, `failed`): the last event of a stream.
const TERMINAL: u8 = 3;

/// What a stream hears from its process's subscriber.
#[derive(Debug, Clone)]
pub(super) enum Hint {
    /// A model id or a deployment id a worker published: that deployment moved.
    Moved(Arc<str>),
    /// Anything may have moved: the subscriber reconnected (and subscribed again) after
    /// losing Redis, or fell behind; every stream re-reads.
    Any,
}

/// The process's one Pub/Sub subscriber of the progress channel and the fan-out to its
/// streams.
pub struct Notifications {
    /// Kept for the life of the process (its connection is the subscription).
    _subscriber: SubscriberClient,
    hints: broadcast::Sender<Hint>,
    /// Cancelled when the API shuts down: every open stream ends, so the graceful shutdown
    /// does not wait for them.
    stop: CancellationToken,
}

impl Notifications {
    /// Connects a subscriber with the command client's settings (URL, ACL user, password,
    /// TLS, timeouts, reconnection policy), subscribes to the progress channel and starts the
    /// fan-out. On every reconnection it subscribes again before telling the streams to re-read,
    /// so a Redis restart does not end the notifications.
    pub(super) async fn start(redis: &Client, state_prefix: &str) -> anyhow::Result<Notifications> {
        let channel = queue::progress_channel(state_prefix);
        let mut perf = redis.perf_config();
        perf.broadcast_channel_capacity = FAN_OUT;
        let mut builder = Builder::from_config(redis.client_config());
        builder
            .set_performance_config(perf)
            .set_connection_config(redis.connection_config().clone());
        if let Some(policy) = redis.client_reconnect_policy() {
            builder.set_policy(policy);
        }
        let subscriber = builder.build_subscriber_client()?;
        // Receivers taken before connecting: nothing said after SUBSCRIBE is missed.
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();
        subscriber.init().await?;
        subscriber.subscribe(channel.as_str()).await.map_err(|e| {
            anyhow::anyhow!(
                "subscribing to the Redis channel {channel} (the API's Redis user needs it and \
                 +@pubsub: `hokusai-deployer redis-acl`): {e}"
            )
        })?;
        let (hints, _) = broadcast::channel(FAN_OUT);
        tokio::spawn(fan_out(
            subscriber.clone(),
            messages,
            reconnects,
            channel,
            hints.clone(),
        ));
        Ok(Notifications {
            _subscriber: subscriber,
            hints,
            stop: CancellationToken::new(),
        })
    }

    /// Ends every open stream (the API is shutting down).
    pub(super) fn close_streams(&self) {
        self.stop.cancel();
    }
}

/// Passes the progress channel's messages on to the streams; after a reconnection, subscribes
/// again and then has every stream re-read (what was published meanwhile is lost).
async fn fan_out(
    subscriber: SubscriberClient,
    mut messages: broadcast::Receiver<fred::types::Message>,
    mut reconnects: broadcast::Receiver<fred::types::config::Server>,
    channel: String,
    hints: broadcast::Sender<Hint>,
) {
    loop {
        tokio::select! {
            m = messages.recv() => match m {
                Ok(m) if &*m.channel == channel.as_str() => {
                    if let Some(id) = m.value.as_string() {
                        let _ = hints.send(Hint::Moved(id.into()));
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    warn!(missed = n, "progress notifications fell behind; every stream re-reads");
                    let _ = hints.send(Hint::Any);
                }
                Err(RecvError::Closed) => return,
            },
            r = reconnects.recv() => match r {
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    while let Err(e) = subscriber.resubscribe_all().await {
                        warn!(error = %e, %channel, "subscribing again to progress notifications failed; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    info!(%channel, "subscribed to progress notifications");
                    let _ = hints.send(Hint::Any);
                }
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// A status's event id: 1 `pending`, 2 `deploying`, 3 `completed` or `failed`.
pub fn rank(status: &str) -> u8 {
    match status {
        "completed" | "failed" => TERMINAL,
        "deploying" => 2,
        _ => 1,
    }
}

/// The client's last event id: the `Last-Event-ID` header, else `lastEventId` in the query
/// (`event-source-polyfill`); 0 when there is none or it is not one of ours.
pub fn last_event_id(headers: &HeaderMap, query: Option<&str>) -> u8 {
    let header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let query = || {
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .find(|(k, _)| k == "lastEventId")
            .map(|(_, v)| v.into_owned())
    };
    header
        .or_else(query)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(0, |n| n.min(u64::from(TERMINAL)) as u8)
}

#[utoipa::path(
    get,
    path = "/api/deployments/{id}/events",
    params(
        ("id" = String, Path, description = "The deployment_id of the POST's answer"),
        ("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received (EventSource sends it when it reconnects): only later statuses are sent"),
        ("lastEventId" = Option<String>, Query, description = "The same as Last-Event-ID, for clients that cannot send the header (event-source-polyfill's reconnections)"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: the current status at once, then each transition; `id:` 1 pending, 2 deploying, 3 completed or failed; `data:` the status endpoint's JSON body (DeploymentStatusResponse); `:` keep-alive comments; the stream ends after the terminal status (see docs/api.md)", content_type = "text/event-stream", body = String),
        (status = 204, description = "The deployment has ended and Last-Event-ID is its terminal id 3: nothing more will come (EventSource stops reconnecting)"),
        (status = 401, description = "AUTH_FAILED", body = ErrorResponse),
        (status = 404, description = "DEPLOYMENT_NOT_FOUND (also for another user's deployment)", body = ErrorResponse),
        (status = 429, description = "RATE_LIMIT_EXCEEDED: status and quote requests (a stream's opening counts as one) per user, or failed authentications per client address", body = ErrorResponse),
        (status = 503, description = "UPSTREAM_UNAVAILABLE or TIMEOUT (before the stream starts)", body = ErrorResponse),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn events(
    State(state): State<Arc<ApiState>>,
    Extension(client): Extension<ClientIp>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let mut req = Request::new(ROUTE, client.label());
    // Listening before the first read: a transition right after it is heard.
    let hints = state.notifications.hints.subscribe();
    // `api.request_timeout_ms` bounds what comes before the stream, not the stream.
    let limit = Duration::from_millis(state.settings.api.request_timeout_ms);
    let opened = tokio::time::timeout(limit, status::authorized(&state, &mut req, &id, &headers))
        .await
        .unwrap_or_else(|_| Err(ApiError::timeout()));
    let (first, expires_at) = match opened {
        Ok(o) => o,
        Err(e) => return req.finish(&state, Err(e)),
    };
    let seen = last_event_id(&headers, query.as_deref());
    if rank(&first.status) == TERMINAL && seen >= TERMINAL {
        debug!(deployment_id = %id, "stream asked again after its terminal event");
        return StatusCode::NO_CONTENT.into_response();
    }
    let s = &state.settings.api;
    let mut life = Duration::from_secs(s.events_max_secs.max(1));
    if expires_at > 0 {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        life = life.min(Duration::from_secs(expires_at.saturating_sub(now).max(1)));
    }
    let recheck = Duration::from_secs(s.events_recheck_secs.max(1));
    let keepalive = Duration::from_secs(s.events_keepalive_secs.max(1));
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval_at(start + recheck, recheck);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watch = Watch {
        model_id: first.model_id.clone(),
        next: Some(first),
        sent: seen,
        id,
        hints,
        tick,
        until: start + life,
        state: state.clone(),
        done: false,
    };
    let sse = Sse::new(watch.into_stream())
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"));
    (
        [
            // As every answer of the API (axum's `no-cache` is weaker).
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            // nginx and its kind would buffer the stream otherwise.
            (
                HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        sse,
    )
        .into_response()
}

/// One open stream.
struct Watch {
    state: Arc<ApiState>,
    id: String,
    model_id: String,
    hints: broadcast::Receiver<Hint>,
    /// The client's rank: the last sent, or its `Last-Event-ID`.
    sent: u8,
    /// A status read and not yet weighed (the first one).
    next: Option<DeploymentStatusResponse>,
    tick: tokio::time::Interval,
    /// The end of the stream's life (`api.events_max_secs`, or the token's expiry).
    until: tokio::time::Instant,
    /// The terminal status is sent.
    done: bool,
}

impl Watch {
    fn into_stream(self) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
        futures::stream::unfold(
            self,
            |w| async move { w.step().await.map(|(e, w)| (Ok(e), w)) },
        )
    }

    /// The next event to send, or `None` to end the stream.
    async fn step(mut self) -> Option<(Event, Watch)> {
        loop {
            if self.done {
                return None;
            }
            let s = match self.next.take() {
                Some(s) => s,
                None => {
                    if !self.wait().await? {
                        continue;
                    }
                    match status::current(&self.state, &self.id).await {
                        Ok(Some(s)) => s,
                        // Its record expired (`api.deployment_ttl_days`).
                        Ok(None) => return None,
                        Err(e) => {
                            // Redis is away: readiness says so; the next tick tries again.
                            debug!(deployment_id = %self.id, error = %e.message, "live status: the status could not be read");
                            continue;
                        }
                    }
                }
            };
            let r = rank(&s.status);
            if r > self.sent {
                self.sent = r;
                self.done = r == TERMINAL;
                let data = serde_json::to_string(&s).expect("a status always serializes");
                return Some((Event::default().id(r.to_string()).data(data), self));
            }
            if r == TERMINAL {
                return None;
            }
            // Nothing new for the client. When it is below what the client has, a reorganisation
            // took the event back (or a dropped transaction its hash) and the deployment is
            // under way again: its next step is sent when it comes.
            self.sent = r;
        }
    }

    /// Waits for a reason to re-read: a notification naming this deployment, anything that
    /// may hide one, or the tick. `Some(false)`: a notification for another deployment;
    /// `None`: the stream's life is over (or the API is shutting down).
    async fn wait(&mut self) -> Option<bool> {
        let stop = self.state.notifications.stop.clone();
        tokio::select! {
            _ = stop.cancelled() => None,
            _ = tokio::time::sleep_until(self.until) => None,
            _ = self.tick.tick() => Some(true),
            h = self.hints.recv() => match h {
                Ok(Hint::Moved(x)) => Some(*x == *self.id || *x == *self.model_id),
                Ok(Hint::Any) | Err(RecvError::Lagged(_)) => Some(true),
                // The process's fan-out is gone with its state: never while the stream runs.
                Err(RecvError::Closed) => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_order_the_statuses() {
        assert_eq!(
            ["pending", "deploying", "completed", "failed"].map(rank),
            [1, 2, 3, 3]
        );
    }

    #[test]
    fn the_last_event_id_comes_from_the_header_else_the_query() {
        let mut h = HeaderMap::new();
        assert_eq!(last_event_id(&h, None), 0);
        assert_eq!(last_event_id(&h, Some("lastEventId=2")), 2);
        assert_eq!(last_event_id(&h, Some("a=b&lastEventId=%203")), 3);
        h.insert("last-event-id", HeaderValue::from_static("1"));
        assert_eq!(last_event_id(&h, Some("lastEventId=3")), 1);
        h.insert("last-event-id", HeaderValue::from_static("99"));
        assert_eq!(last_event_id(&h, None), 3);
        h.insert("last-event-id", HeaderValue::from_static("x"));
        assert_eq!(last_event_id(&h, None), 0);
    }
}
