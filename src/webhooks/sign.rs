//! The signature of an outbound delivery: the scheme of the ML platform's DeltaOne webhooks,
//! so a receiver can reuse its check.
//!
//! `X-Hokusai-Signature: sha256=<hex HMAC-SHA256(secret, "{timestamp}.{nonce}." + body)>`, with
//! `X-Hokusai-Timestamp` (unix seconds) and `X-Hokusai-Nonce` (uuid4) fresh on every attempt.
//! While a secret is rotated out, its signature goes beside in `X-Hokusai-Signature-Previous`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;

/// The headers of one attempt, in the order sent.
pub fn headers(
    secrets: &[Secret],
    timestamp: i64,
    nonce: &str,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("X-Hokusai-Timestamp", timestamp.to_string()),
        ("X-Hokusai-Nonce", nonce.to_owned()),
    ];
    let names = ["X-Hokusai-Signature", "X-Hokusai-Signature-Previous"];
    for (name, secret) in names.into_iter().zip(secrets) {
        out.push((
            name,
            format!("sha256={}", signature(secret, timestamp, nonce, body)),
        ));
    }
    out
}

/// Hex HMAC-SHA256 of `"{timestamp}.{nonce}." + body` under `secret`.
pub fn signature(secret: &Secret, timestamp: i64, nonce: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.expose().as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(format!("{timestamp}.{nonce}.").as_bytes());
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vector computed independently: `printf '1700000000.n-1.{}' | openssl dgst -sha256 -hmac key`.
    #[test]
    fn signs_timestamp_nonce_and_body() {
        let s = signature(&Secret::new("key"), 1_700_000_000, "n-1", b"{}");
        assert_eq!(
            s,
            "5e51013a32f3440bb564bfe7f8c89b6a2c2d2737b640af383835e3fee4753a52"
        );
    }
}
