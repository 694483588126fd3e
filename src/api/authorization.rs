//! Who asks, and what they may do.
//!
//! - **The client's address** ([`client_ip`]): the peer, or the `X-Forwarded-For` hop that our
//!   trusted proxies (`api.trusted_proxies`) vouch for. Failed authentication is throttled by
//!   it.
//! - **Authentication** ([`ApiState::authenticate`]): a JWT or a service key
//!   ([`super::credentials`]), and optionally a Sign-In with Ethereum proof ([`super::siwe`]).
//!   Failures are counted per client address, exactly across API processes
//!   (`api.limits.auth_failures_per_minute`); over the limit the client gets `429` for
//!   anything it sends.
//! - **Authorization** ([`Authenticated::may_name`], [`Authenticated::may_deploy`]): an
//!   address counts as the caller's only when proven (the JWT's address claim or a SIWE
//!   proof). A proven address that is the model's contributor, or the model's owner (`sub` =
//!   the owner tag), may deploy; naming an unproven contributor proves nothing. Service keys
//!   are trusted.
//! - **Once only** ([`ApiState::take_once`]): a JWT's `jti` and a SIWE nonce are taken in
//!   Redis (set-if-absent) by the request that uses them.

use std::net::IpAddr;

use alloy::primitives::Address;
use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, StatusCode};
use base64::Engine;
use fred::prelude::*;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use tracing::info;

use super::credentials::{Caller, Refused};
use super::errors::{ApiError, Request};
use super::limits::Decision;
use super::siwe::{Proof, ProofError, Proven};
use super::ApiState;
use crate::mlflow::Model;

/// The headers that may carry a SIWE proof (the message base64-encoded: it has line breaks).
const SIWE_MESSAGE_HEADER: &str = "x-siwe-message";
const SIWE_SIGNATURE_HEADER: &str = "x-siwe-signature";

/// The client's address, as [`client_ip`] found it; `None` when the server was not given the
/// peer's address (a router driven without a socket).
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

impl ClientIp {
    pub fn label(self) -> String {
        self.0.map_or_else(|| "unknown".into(), |ip| ip.to_string())
    }
}

/// The client of a request from `peer`: the peer itself unless it is a trusted proxy; then the
/// nearest `X-Forwarded-For` hop that is not one (hops further left are the client's word).
pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer?.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(&client) {
            break;
        }
    }
    Some(client)
}

/// Middleware: puts the request's [`ClientIp`] in its extensions.
pub async fn with_client_ip(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<ApiState>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let ip = client_ip(peer, req.headers(), &state.trusted_proxies);
    req.extensions_mut().insert(ClientIp(ip));
    next.run(req).await
}

/// An authenticated caller and the addresses it has proven.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub caller: Caller,
    /// A valid SIWE proof sent with the request (its nonce not yet taken).
    pub siwe: Option<Proven>,
}

impl Authenticated {
    /// `a` is proven to be the caller's: the JWT's address claim or the SIWE proof's signer.
    pub fn proves(&self, a: Address) -> bool {
        self.caller.address == Some(a) || self.siwe.as_ref().is_some_and(|p| p.address == a)
    }

    /// Before the model is read: a caller whose token names an address may name only that
    /// address or one proven by SIWE (the token's issuer tied the session to a wallet).
    pub fn may_name(&self, user_address: Address) -> Result<(), ApiError> {
        if self.caller.service || self.caller.address.is_none() || self.proves(user_address) {
            return Ok(());
        }
        Err(ApiError::forbidden(
            "user_address is neither your token's address nor one you proved with a SIWE message",
        ))
    }

    /// The deployment rule of seed 000 §4 with proven addresses: a service key; the model's
    /// owner (`sub` = the owner tag); or a contributor whose address is proven.
    pub fn may_deploy(&self, user_address: Address, model: &Model) -> Result<(), ApiError> {
        if self.caller.service || model.owner.as_deref() == Some(self.caller.user_id.as_str()) {
            return Ok(());
        }
        if self.proves(user_address) && model.contributors.contains(&user_address) {
            return Ok(());
        }
        Err(ApiError::forbidden(
            if model.contributors.contains(&user_address) {
                "user_address is a contributor of this model, but you have not proven it is yours: send a SIWE message signed by it (siwe_message, siwe_signature) or a token with its address"
            } else {
                "you are neither the owner nor a contributor of this model"
            },
        ))
    }
}

/// The SIWE proof of a request: the body's `siwe_message` and `siwe_signature`, else the
/// `X-SIWE-Message` (base64) and `X-SIWE-Signature` headers.
pub fn proof(headers: &HeaderMap, body: Option<(&str, &str)>) -> Result<Option<Proof>, ApiError> {
    if let Some((message, signature)) = body {
        return Ok(Some(Proof {
            message: message.to_owned(),
            signature: signature.to_owned(),
        }));
    }
    let get = |h: &str| headers.get(h).map(|v| v.to_str().unwrap_or(""));
    match (get(SIWE_MESSAGE_HEADER), get(SIWE_SIGNATURE_HEADER)) {
        (None, None) => Ok(None),
        (Some(m), Some(s)) => {
            let message = base64::engine::general_purpose::STANDARD
                .decode(m.trim())
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::invalid(
                        "X-SIWE-Message",
                        "base64",
                        "X-SIWE-Message must be the SIWE message in base64",
                    )
                })?;
            Ok(Some(Proof {
                message,
                signature: s.to_owned(),
            }))
        }
        (m, _) => Err(ApiError::invalid(
            if m.is_some() {
                "X-SIWE-Signature"
            } else {
                "X-SIWE-Message"
            },
            "required",
            "X-SIWE-Message and X-SIWE-Signature go together",
        )),
    }
}

impl ApiState {
    /// The caller, from `Authorization: Bearer`, `X-API-Key` or the body's `auth_token` (the
    /// first present decides).
    fn credentials(
        &self,
        headers: &HeaderMap,
        body_token: Option<&str>,
    ) -> Result<Caller, Refused> {
        if let Some(h) = headers.get(header::AUTHORIZATION) {
            let v = h.to_str().unwrap_or("");
            let token = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .ok_or_else(|| Refused("Authorization is not `Bearer <token>`".into()))?;
            return self.auth.jwt(token.trim());
        }
        if let Some(k) = headers.get("x-api-key") {
            return self.auth.service_key(k.to_str().unwrap_or(""));
        }
        match body_token {
            Some(t) => self.auth.jwt(t.trim()),
            None => Err(Refused("no credentials".into())),
        }
    }

    /// Authenticates a request, under the failed-authentication limit of its client: a
    /// throttled client gets `429` whatever it sends, so it cannot tell good credentials from
    /// bad ones; a failure is recorded only while the client is under the limit.
    pub(super) async fn authenticate(
        &self,
        req: &mut Request,
        headers: &HeaderMap,
        body_token: Option<&str>,
        proof: Option<Proof>,
    ) -> Result<Authenticated, ApiError> {
        let now = chrono::Utc::now().timestamp();
        let checked = match self.credentials(headers, body_token) {
            Err(e) => Err(e),
            Ok(caller) => {
                req.caller = Some(caller.user_id.clone());
                match proof.map(|p| self.siwe.verify(&p, now)).transpose() {
                    Ok(siwe) => Ok(Authenticated { caller, siwe }),
                    Err(ProofError::Refused(e)) => Err(e),
                    // Bad input, not a failed authentication: named, and not counted.
                    Err(ProofError::Malformed { field, reason }) => {
                        return Err(ApiError::invalid(field, "eip4361", reason))
                    }
                }
            }
        };
        let throttled = |limit, retry_after_secs| {
            ApiError::throttled(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMIT_EXCEEDED",
                format!(
                    "too many failed authentications from your address (at most {limit} a minute)"
                ),
                limit,
                retry_after_secs,
            )
        };
        match checked {
            Ok(who) => match self
                .limiter
                .auth_allowed(&req.client)
                .await
                .map_err(ApiError::redis)?
            {
                Decision::Admitted { .. } => Ok(who),
                Decision::Refused {
                    limit,
                    retry_after_secs,
                    ..
                } => Err(throttled(limit, retry_after_secs)),
            },
            Err(e) => {
                info!(reason = %e, client = %req.client, "authentication refused");
                let attempt = uuid::Uuid::new_v4().to_string();
                match self
                    .limiter
                    .auth_failed(&req.client, &attempt)
                    .await
                    .map_err(ApiError::redis)?
                {
                    Decision::Admitted { .. } => Err(ApiError::auth()),
                    Decision::Refused {
                        limit,
                        retry_after_secs,
                        ..
                    } => Err(throttled(limit, retry_after_secs)),
                }
            }
        }
    }

    /// Admits one status or quote read of the caller (`api.limits.status_per_minute`).
    pub(super) async fn admit_read(&self, user: &str) -> Result<(), ApiError> {
        let member = uuid::Uuid::new_v4().to_string();
        match self
            .limiter
            .read(user, &member)
            .await
            .map_err(ApiError::redis)?
        {
            Decision::Admitted { .. } => Ok(()),
            Decision::Refused {
                limit,
                retry_after_secs,
                ..
            } => Err(ApiError::throttled(
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMIT_EXCEEDED",
                format!("at most {limit} status and quote requests a minute"),
                limit,
                retry_after_secs,
            )),
        }
    }

    /// Takes `key` for `value` until it expires in `ttl_secs`: false when it was taken before.
    pub(super) async fn take_once(
        &self,
        key: &str,
        value: &str,
        ttl_secs: u64,
    ) -> Result<bool, ApiError> {
        let earlier: Option<String> = self
            .redis
            .set(
                key,
                value,
                Some(fred::types::Expiration::EX(ttl_secs.max(1) as i64)),
                Some(fred::types::SetOptions::NX),
                true,
            )
            .await
            .map_err(ApiError::redis)?;
        Ok(earlier.is_none())
    }

    /// The key that marks a JWT's `jti` as used (hashed: a `jti` is the issuer's free text).
    pub(super) fn jti_key(&self, jti: &str) -> String {
        self.key("jti", &hex::encode(Sha256::digest(jti.as_bytes())))
    }

    /// The key that marks a SIWE nonce as used.
    pub(super) fn nonce_key(&self, nonce: &str) -> String {
        self.key("siwe-nonce", nonce)
    }

    /// Refuses a proof whose nonce was used, without taking it (the quote).
    pub(super) async fn nonce_unused(&self, proven: &Proven) -> Result<(), ApiError> {
        let used: i64 = self
            .redis
            .exists(self.nonce_key(&proven.nonce))
            .await
            .map_err(ApiError::redis)?;
        if used > 0 {
            info!("SIWE nonce reused");
            return Err(ApiError::auth());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_is_the_peer_unless_a_trusted_proxy_forwards_for_it() {
        let trusted = vec![crate::config::parse_net("10.0.0.0/8").unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.7, 10.1.2.3".parse().unwrap(),
        );
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        // Through our proxies: the nearest hop they do not cover; the client's own word
        // (6.6.6.6, further left) is not taken.
        assert_eq!(client_ip(ip("10.0.0.5"), &h, &trusted), ip("203.0.113.7"));
        // From anyone else the header is ignored.
        assert_eq!(
            client_ip(ip("198.51.100.1"), &h, &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(client_ip(ip("10.0.0.5"), &h, &[]), ip("10.0.0.5"));
        // A garbled hop stops the walk at the last good one.
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(client_ip(ip("10.0.0.5"), &h, &trusted), ip("10.0.0.5"));
        // IPv4 peers seen through an IPv6 socket are the same client.
        assert_eq!(
            client_ip(ip("::ffff:198.51.100.1"), &HeaderMap::new(), &[]),
            ip("198.51.100.1")
        );
    }
}
