//! The live status stream, `GET /api/deployments/{id}/events` (Server-Sent Events), against
//! real Redis, anvil, MLflow, workers and API processes. The stream is read as a browser's
//! `EventSource` reads it: the raw body, split into events at blank lines, `id:` and `data:`
//! fields and `:` comments.
//!
//! The tests that follow a deployment run their API processes with a re-read tick of an hour,
//! so only the workers' Pub/Sub notifications can move their streams; the tick has a test of
//! its own, in which no notification comes.

use std::time::{Duration, Instant};

use fred::prelude::*;
use serde_json::{json, Value};

use crate::api::{
    jwt, mlflow, post, ready, request, seed_model, status_of, unique, OWNER, OWNER_ADDRESS,
};
use crate::harness::{Daemon, Stack};

/// Only notifications move a stream of an API process with this tick.
const NO_TICK: (&str, &str) = ("HOKUSAI__API__EVENTS_RECHECK_SECS", "3600");

/// One event of the stream, as `EventSource` dispatches it.
#[derive(Debug)]
struct Event {
    id: Option<String>,
    /// The `event:` field (none: `onmessage` gets it).
    name: Option<String>,
    data: Value,
}

/// What the stream sent next.
#[derive(Debug)]
enum Item {
    Event(Event),
    /// A comment line (`: keep-alive`).
    Comment(String),
    /// The server closed the stream.
    End,
}

/// An open stream, read as it comes.
struct Stream {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Stream {
    /// The next event or comment, or the end; `None` if nothing came by `deadline`.
    async fn item_by(&mut self, deadline: Instant) -> Option<Item> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                return Some(parse(&String::from_utf8(block).expect("UTF-8")));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.response.chunk()).await {
                Err(_) => return None,
                Ok(Ok(Some(chunk))) => self.buffer.extend_from_slice(&chunk),
                Ok(Ok(None)) => {
                    assert!(self.buffer.is_empty(), "a partial event: {:?}", self.buffer);
                    return Some(Item::End);
                }
                Ok(Err(e)) => panic!("the stream broke: {e}"),
            }
        }
    }

    /// The next event or comment, or the end; fails the test if nothing comes `within`.
    async fn item(&mut self, within: Duration) -> Item {
        let deadline = Instant::now() + within;
        self.item_by(deadline)
            .await
            .unwrap_or_else(|| panic!("the stream sent nothing within {within:?}"))
    }

    /// The next event, skipping comments; `None` at the end of the stream. Fails the test,
    /// naming `what` it waited for, if no event or end comes `within`.
    async fn event(&mut self, within: Duration, what: &str) -> Option<Event> {
        let deadline = Instant::now() + within;
        loop {
            match self.item_by(deadline).await {
                Some(Item::Event(e)) => return Some(e),
                Some(Item::Comment(_)) => {}
                Some(Item::End) => return None,
                None => panic!(
                    "waiting for {what}: no event and no end of the stream within {within:?}"
                ),
            }
        }
    }

    /// Events until the stream ends; fails the test, naming `what` it waited for, if it has
    /// not ended `within`.
    async fn rest(&mut self, within: Duration, what: &str) -> Vec<Event> {
        let deadline = Instant::now() + within;
        let mut all = Vec::new();
        loop {
            match self.item_by(deadline).await {
                Some(Item::Event(e)) => all.push(e),
                Some(Item::Comment(_)) => {}
                Some(Item::End) => return all,
                None => panic!(
                    "waiting for {what}: the stream did not end within {within:?}; events so far: {all:?}"
                ),
            }
        }
    }
}

/// One block of lines, ended by a blank line.
fn parse(block: &str) -> Item {
    let (mut id, mut name, mut data, mut comment) = (None, None, Vec::new(), None);
    for line in block.lines().filter(|l| !l.is_empty()) {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "" => comment = Some(value.to_owned()),
            "id" => id = Some(value.to_owned()),
            "event" => name = Some(value.to_owned()),
            "data" => data.push(value.to_owned()),
            other => panic!("unexpected field {other:?} in {block:?}"),
        }
    }
    if data.is_empty() {
        return Item::Comment(comment.expect("a block is an event or a comment"));
    }
    let data = data.join("\n");
    Item::Event(Event {
        id,
        name,
        data: serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}")),
    })
}

/// Opens the stream of deployment `id`: the answer's status, and the stream when it is 200.
async fn open(
    api: &Daemon,
    token: Option<&str>,
    id: &str,
    headers: &[(&str, &str)],
    query: &str,
) -> (u16, reqwest::header::HeaderMap, Stream) {
    let mut r = reqwest::Client::new().get(format!(
        "http://127.0.0.1:{}/api/deployments/{id}/events{query}",
        api.ops_port
    ));
    if let Some(t) = token {
        r = r.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let response = r.send().await.expect("the API answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    (
        status,
        headers,
        Stream {
            response,
            buffer: Vec::new(),
        },
    )
}

/// Opens a stream that must be accepted.
async fn stream(api: &Daemon, token: &str, id: &str) -> Stream {
    let (code, headers, s) = open(api, Some(token), id, &[], "").await;
    assert_eq!(code, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    let cache: Vec<_> = headers.get_all("cache-control").iter().collect();
    assert_eq!(cache, ["no-store"]);
    s
}

/// The event's status, checking what every event has: an id equal to the status's rank and
/// no event name (so `EventSource.onmessage` gets it).
#[track_caller]
fn checked(e: &Event, deployment: &str) -> String {
    let status = e.data["status"].as_str().expect("a status").to_owned();
    let rank = match status.as_str() {
        "pending" => "1",
        "deploying" => "2",
        "completed" | "failed" => "3",
        other => panic!("status {other}"),
    };
    assert_eq!(e.id.as_deref(), Some(rank), "{e:?}");
    assert_eq!(e.name, None, "{e:?}");
    assert_eq!(e.data["deployment_id"], deployment, "{e:?}");
    status
}

/// A deployment posted by the owner; its id.
async fn deployment(api: &Daemon, token: &str, name: &str) -> String {
    let model = seed_model(&unique(name), true).await;
    let a = post(api, Some(token), request(&model), &[]).await;
    assert_eq!(a.status, 202, "{}", a.body);
    a.body["deployment_id"].as_str().unwrap().to_owned()
}

/// The failure outcome a dead-lettering worker writes, written here by hand and announced to
/// no one (as if its notification were lost) unless the caller publishes it.
async fn fail_quietly(stack: &Stack, id: &str) {
    let failed = json!({
        "event_type": "token_deployment_failed", "message_id": id, "model_id": null,
        "error_code": "DEPLOYMENT_FAILED", "error_message": "refused by hand",
        "attempts": 1, "failed_at": chrono::Utc::now().to_rfc3339(), "message_version": "1.0",
    });
    let _: () = stack
        .client
        .set(
            format!("hokusai:deployer:outcome:{id}"),
            failed.to_string(),
            None,
            None,
            false,
        )
        .await
        .unwrap();
}

/// anvil mining only when told, from now on.
async fn manual_mining(stack: &Stack) -> alloy::providers::DynProvider {
    use alloy::providers::Provider;
    let p = stack.provider();
    let _: () = p
        .raw_request("evm_setAutomine".into(), (false,))
        .await
        .expect("evm_setAutomine");
    p
}

/// (1) and (2): one deployment followed by two streams on two API processes, pending, deploying
/// (its transaction held in anvil's pool) and completed, in order, each with the status
/// endpoint's body, and the end of both streams. Then a reconnection after the end
/// (`Last-Event-ID: 3`, header or query) is `204` with nothing to read, one from `deploying`
/// gets only the end, and refused callers get the status endpoint's errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_api_processes_stream_pending_deploying_completed_in_order_then_close() {
    let stack = Stack::start().await;
    let apis = [
        stack.api("sse-a", mlflow().await, &[NO_TICK]),
        stack.api("sse-b", mlflow().await, &[NO_TICK]),
    ];
    for a in &apis {
        ready(a).await;
    }
    let token = jwt(OWNER, OWNER_ADDRESS);
    let id = deployment(&apis[0], &token, "sse_flow").await;
    let mut streams = [
        stream(&apis[0], &token, &id).await,
        stream(&apis[1], &token, &id).await,
    ];
    let wait = Duration::from_secs(30);
    for s in &mut streams {
        let e = s
            .event(wait, "pending")
            .await
            .expect("the current status at once");
        assert_eq!(checked(&e, &id), "pending", "{e:?}");
    }

    // The worker signs and sends the transaction; anvil holds it until it is mined.
    let miner = manual_mining(&stack).await;
    let worker = stack.worker(&[]);
    let mut deploying = Vec::new();
    for s in &mut streams {
        let e = s.event(wait, "deploying").await.expect("deploying");
        assert_eq!(checked(&e, &id), "deploying", "{e:?}");
        assert_eq!(e.data["deployment_tx_hash"].as_str().unwrap().len(), 66);
        deploying.push(e.data);
    }
    let mining = tokio::spawn(async move {
        use alloy::providers::Provider;
        loop {
            let _: Result<String, _> = miner.raw_request("evm_mine".into(), ()).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut completed = Vec::new();
    for s in &mut streams {
        let rest = s.rest(wait, "completed and the end").await;
        assert_eq!(rest.len(), 1, "completed, then the end: {rest:?}");
        assert_eq!(checked(&rest[0], &id), "completed", "{:?}", rest[0]);
        completed.push(rest[0].data.clone());
    }
    mining.abort();
    worker.stop().await;
    // Each event is the status endpoint's answer at that moment.
    let (code, now) = status_of(&apis[1], &token, &id).await;
    assert_eq!(code, 200);
    assert_eq!(completed, [now.clone(), now.clone()]);
    assert_eq!(deploying[0], deploying[1]);
    assert_eq!(
        deploying[0]["deployment_tx_hash"], now["deployment_tx_hash"],
        "{now}"
    );
    assert!(deploying[0]["updated_at"].as_str() < now["updated_at"].as_str());

    // After the end: the terminal id in either form gets 204 and no body (EventSource stops).
    for (headers, query) in [
        (&[("last-event-id", "3")][..], ""),
        (&[][..], "?lastEventId=3"),
    ] {
        let (code, _, mut s) = open(&apis[0], Some(&token), &id, headers, query).await;
        assert_eq!(code, 204, "{headers:?} {query}");
        assert!(matches!(s.item(wait).await, Item::End));
    }
    // From `deploying`: only the end; from nothing: the end at once.
    for headers in [&[("last-event-id", "2")][..], &[][..]] {
        let (code, _, mut s) = open(&apis[1], Some(&token), &id, headers, "").await;
        assert_eq!(code, 200);
        let rest = s.rest(wait, "completed and the end").await;
        assert_eq!(rest.len(), 1, "{headers:?}: {rest:?}");
        assert_eq!(rest[0].data, now);
    }

    // (4) Refused as the status endpoint refuses: no credentials, another user, no such id.
    let (code, _, s) = open(&apis[0], None, &id, &[], "").await;
    let body: Value = s.response.json().await.unwrap();
    assert_eq!((code, &body["error"]["code"]), (401, &json!("AUTH_FAILED")));
    let stranger = jwt("user-9", "0x000000000000000000000000000000000000dEaD");
    for (token, id) in [(&stranger, id.as_str()), (&token, "no-such-deployment")] {
        let (code, _, s) = open(&apis[0], Some(token), id, &[], "").await;
        let body: Value = s.response.json().await.unwrap();
        assert_eq!(
            (code, &body["error"]["code"]),
            (404, &json!("DEPLOYMENT_NOT_FOUND")),
            "{body}"
        );
    }
}

/// (5) A deployment the chain refuses (the worker's key lost its deployer role after start-up)
/// is dead-lettered; the dead letter's notification (the message id) ends the stream with
/// `failed`, the status endpoint's body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_the_chain_refuses_ends_its_stream_with_failed() {
    let stack = Stack::start().await;
    let api = stack.api("sse-refused", mlflow().await, &[NO_TICK]);
    ready(&api).await;
    let status = std::sync::Arc::new(hokusai_deployer::pipeline::WorkerStatus::default());
    let worker = crate::harness::Worker::start(
        stack.settings(&[]),
        hokusai_deployer::pipeline::RunOptions {
            status: status.clone(),
            ..Default::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while status.phase() != "running" {
        assert!(Instant::now() < deadline, "the worker never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let owner = alloy::providers::ProviderBuilder::new()
        .wallet(alloy::network::EthereumWallet::from(
            hokusai_deployer::localstack::ANVIL_DEV_KEY
                .parse::<alloy::signers::local::PrivateKeySigner>()
                .unwrap(),
        ))
        .connect_http(stack.anvil.url("http").parse().unwrap());
    let dev = hokusai_deployer::chain::signer(&hokusai_deployer::config::Secret::new(
        hokusai_deployer::localstack::ANVIL_DEV_KEY,
    ))
    .unwrap()
    .address();
    hokusai_deployer::chain::TokenManager::new(stack.boot.token_manager, &owner)
        .setDeployer(dev, false)
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    let token = jwt(OWNER, OWNER_ADDRESS);
    let id = deployment(&api, &token, "sse_refused").await;
    let mut s = stream(&api, &token, &id).await;
    let events = s.rest(Duration::from_secs(30), "failed and the end").await;
    worker.stop().await;
    let statuses: Vec<String> = events.iter().map(|e| checked(e, &id)).collect();
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("failed"),
        "{events:?}"
    );
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_deref().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let (_, now) = status_of(&api, &token, &id).await;
    assert_eq!(events.last().unwrap().data, now);
    assert_eq!(now["error"]["code"], "DEPLOYMENT_FAILED", "{now}");
}

/// Without any notification (the outcome written by hand, announced to no one) a stream still
/// moves at its tick; a quiet stream carries keep-alive comments; a stream ends at
/// `api.events_max_secs`, and at once when its API process shuts down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_notifications_the_tick_moves_the_stream_and_its_life_is_bounded() {
    let stack = Stack::start().await;
    let mut ticking = stack.api(
        "sse-tick",
        mlflow().await,
        &[
            ("HOKUSAI__API__EVENTS_RECHECK_SECS", "1"),
            ("HOKUSAI__API__EVENTS_KEEPALIVE_SECS", "1"),
        ],
    );
    let short = stack.api(
        "sse-short",
        mlflow().await,
        &[NO_TICK, ("HOKUSAI__API__EVENTS_MAX_SECS", "2")],
    );
    ready(&ticking).await;
    ready(&short).await;
    let token = jwt(OWNER, OWNER_ADDRESS);
    let wait = Duration::from_secs(10);

    let id = deployment(&ticking, &token, "sse_tick").await;
    let mut s = stream(&ticking, &token, &id).await;
    assert_eq!(
        checked(&s.event(wait, "pending").await.unwrap(), &id),
        "pending"
    );
    match s.item(Duration::from_secs(5)).await {
        Item::Comment(c) => assert_eq!(c, "keep-alive"),
        other => panic!("a keep-alive comment, not {other:?}"),
    }
    fail_quietly(&stack, &id).await;
    let rest = s
        .rest(Duration::from_secs(5), "failed, seen at a tick")
        .await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(checked(&rest[0], &id), "failed");

    // A stream of an hour-long tick, with nothing happening: it ends after its 2 s.
    let id = deployment(&short, &token, "sse_short").await;
    let started = Instant::now();
    let mut s = stream(&short, &token, &id).await;
    assert_eq!(
        checked(&s.event(wait, "pending").await.unwrap(), &id),
        "pending"
    );
    assert!(s.rest(wait, "the end of its life").await.is_empty());
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_millis(1900) && lived < Duration::from_secs(8),
        "{lived:?}"
    );

    // Shutdown ends open streams instead of waiting for them: this process's would live an
    // hour. (Any process serves any deployment.)
    let mut s = stream(&ticking, &token, &id).await;
    assert_eq!(
        checked(&s.event(wait, "pending").await.unwrap(), &id),
        "pending"
    );
    let exit = ticking.sigterm(Duration::from_secs(10)).await;
    assert!(exit.success(), "{exit:?}");
    assert!(s
        .rest(Duration::from_secs(5), "the end at shutdown")
        .await
        .is_empty());
}

/// How many connections are subscribed to `channel` (0 while Redis is away).
async fn subscribers(stack: &Stack, channel: &str) -> u64 {
    let v: Vec<fred::types::Value> = stack
        .client
        .pubsub_numsub(channel)
        .await
        .unwrap_or_default();
    v.get(1).and_then(|n| n.as_u64()).unwrap_or(0)
}

/// Redis restarts (SIGKILL, so the subscriber's connection just drops): the API process
/// subscribes again, and a notification published afterwards still moves its stream, whose tick
/// is an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_resume_after_a_redis_restart() {
    let mut stack = Stack::start().await;
    let api = stack.api("sse-restart", mlflow().await, &[NO_TICK]);
    ready(&api).await;
    let channel = hokusai_deployer::queue::progress_channel("hokusai:deployer");
    assert_eq!(subscribers(&stack, &channel).await, 1);
    stack.restart_redis().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while subscribers(&stack, &channel).await < 1 {
        assert!(Instant::now() < deadline, "the API never subscribed again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ready(&api).await;
    let token = jwt(OWNER, OWNER_ADDRESS);
    let id = deployment(&api, &token, "sse_restart").await;
    let mut s = stream(&api, &token, &id).await;
    assert_eq!(
        checked(
            &s.event(Duration::from_secs(10), "pending").await.unwrap(),
            &id
        ),
        "pending"
    );
    fail_quietly(&stack, &id).await;
    let _: i64 = stack.client.publish(channel, id.as_str()).await.unwrap();
    let rest = s.rest(Duration::from_secs(5), "failed, notified").await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    assert_eq!(checked(&rest[0], &id), "failed");
}
