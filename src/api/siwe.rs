//! Sign-In with Ethereum (EIP-4361): the second way a caller proves an Ethereum address,
//! beside the JWT's address claim. The message is parsed by the `siwe` crate; the signer is
//! recovered with alloy (EIP-191 `personal_sign`) from the message exactly as sent. A proof
//! counts only if it names our domain (`api.siwe.domain`) and a URI under it, this chain's id,
//! is inside its validity times and at most `api.siwe.max_age_secs` old, and its nonce has
//! not been used: the nonce is taken in Redis by the request that uses the proof (see
//! `deployment.rs`), so a proof serves one deployment.
//!
//! Contract wallets (EIP-1271) are not supported yet: their signatures do not recover to the
//! wallet's address and are refused (docs/api.md).

use std::str::FromStr;

use alloy::primitives::{Address, Signature};

use super::credentials::Refused;
use crate::config::SiweSettings;

/// Longest message we read: an EIP-4361 message with a few resources is well under this.
const MAX_MESSAGE_BYTES: usize = 4096;
/// Longest nonce we remember (EIP-4361 asks for at least 8 alphanumerics, sets no maximum).
const MAX_NONCE: usize = 128;

/// A message and its signature as the caller sent them.
#[derive(Debug, Clone)]
pub struct Proof {
    pub message: String,
    /// 65 bytes, hex, `0x` optional.
    pub signature: String,
}

/// Why a proof was not taken.
#[derive(Debug)]
pub enum ProofError {
    /// Not a proof at all (a bad field, answered `400` naming it), as opposed to a proof that
    /// fails its checks.
    Malformed { field: &'static str, reason: String },
    /// A well-formed proof that proves nothing here: an authentication failure.
    Refused(Refused),
}

impl From<Refused> for ProofError {
    fn from(r: Refused) -> Self {
        ProofError::Refused(r)
    }
}

/// An address proven by a valid proof, and the nonce that must be taken to use it.
#[derive(Debug, Clone, PartialEq)]
pub struct Proven {
    pub address: Address,
    pub nonce: String,
    /// How long the nonce must be remembered: until the message can no longer be valid.
    pub nonce_ttl_secs: u64,
}

pub struct Verifier {
    settings: SiweSettings,
    /// The chain a message must name (the RPC's chain id).
    chain_id: u64,
    /// Clock skew allowed on the message's times (`api.jwt.leeway_secs`).
    leeway_secs: i64,
}

fn secs(t: &siwe::TimeStamp) -> Result<i64, ProofError> {
    chrono::DateTime::parse_from_rfc3339(&t.to_string())
        .map(|d| d.timestamp())
        .map_err(|_| ProofError::Malformed {
            field: "siwe_message",
            reason: format!("time `{t}` is not RFC 3339"),
        })
}

impl Verifier {
    pub fn new(settings: SiweSettings, chain_id: u64, leeway_secs: u64) -> Verifier {
        Verifier {
            settings,
            chain_id,
            leeway_secs: leeway_secs as i64,
        }
    }

    /// Checks `proof` at `now` (unix seconds); the nonce is checked by the caller.
    pub fn verify(&self, proof: &Proof, now: i64) -> Result<Proven, ProofError> {
        let refused = |why: String| Refused(format!("SIWE: {why}"));
        let malformed = |field, reason: String| ProofError::Malformed { field, reason };
        if proof.message.len() > MAX_MESSAGE_BYTES {
            return Err(malformed(
                "siwe_message",
                format!("siwe_message is longer than {MAX_MESSAGE_BYTES} bytes"),
            ));
        }
        let msg = siwe::Message::from_str(&proof.message).map_err(|e| {
            malformed(
                "siwe_message",
                format!("siwe_message is not an EIP-4361 message: {e}"),
            )
        })?;
        let sig = Signature::from_str(proof.signature.trim()).map_err(|_| {
            malformed(
                "siwe_signature",
                "siwe_signature must be 65 bytes in hex".into(),
            )
        })?;
        if msg.nonce.len() > MAX_NONCE {
            return Err(malformed(
                "siwe_message",
                format!("the nonce is longer than {MAX_NONCE} characters"),
            ));
        }
        let Some(domain) = &self.settings.domain else {
            return Err(refused("api.siwe.domain is not configured".into()).into());
        };
        if !msg.domain.as_str().eq_ignore_ascii_case(domain) {
            return Err(refused(format!("domain `{}` is not ours", msg.domain)).into());
        }
        let uri = msg.uri.as_str();
        let uri_ok = match &self.settings.uri {
            Some(prefix) => uri.starts_with(prefix.as_str()),
            None => url::Url::parse(uri)
                .ok()
                .and_then(|u| {
                    u.host_str()
                        .map(|h| h.eq_ignore_ascii_case(domain_host(domain)))
                })
                .unwrap_or(false),
        };
        if !uri_ok {
            return Err(refused(format!("URI `{uri}` is not under our domain")).into());
        }
        if msg.chain_id != self.chain_id {
            return Err(refused(format!(
                "chain id {} is not this chain's ({})",
                msg.chain_id, self.chain_id
            ))
            .into());
        }
        let issued = secs(&msg.issued_at)?;
        if issued > now + self.leeway_secs {
            return Err(refused("issued in the future".into()).into());
        }
        let max_age = self.settings.max_age_secs as i64;
        if now - issued > max_age + self.leeway_secs {
            return Err(refused(format!(
                "issued more than {max_age} s ago (api.siwe.max_age_secs)"
            ))
            .into());
        }
        let mut valid_until = issued + max_age;
        if let Some(exp) = &msg.expiration_time {
            let exp = secs(exp)?;
            if now >= exp + self.leeway_secs {
                return Err(refused("expired".into()).into());
            }
            valid_until = valid_until.min(exp);
        }
        if let Some(nbf) = &msg.not_before {
            if now + self.leeway_secs < secs(nbf)? {
                return Err(refused("not valid yet".into()).into());
            }
        }
        // Recovered from the text as sent, not a re-rendering of the parsed message.
        let signer = sig
            .recover_address_from_msg(proof.message.as_bytes())
            .map_err(|_| refused("the signature recovers no address".into()))?;
        let address = Address::from(msg.address);
        if signer != address {
            return Err(refused(format!(
                "signed by {signer}, not by the message's address {address}"
            ))
            .into());
        }
        Ok(Proven {
            address,
            nonce: msg.nonce,
            nonce_ttl_secs: (valid_until + self.leeway_secs - now).max(1) as u64,
        })
    }
}

/// `app.hokus.ai:443` -> `app.hokus.ai`.
fn domain_host(domain: &str) -> &str {
    domain.rsplit_once(':').map_or(domain, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            domain
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::{local::PrivateKeySigner, SignerSync};

    const NOW: i64 = 1_790_000_000;

    fn verifier() -> Verifier {
        Verifier::new(
            SiweSettings {
                domain: Some("app.hokus.ai".into()),
                uri: None,
                max_age_secs: 600,
            },
            31337,
            30,
        )
    }

    fn at(secs: i64) -> String {
        chrono::DateTime::from_timestamp(secs, 0)
            .unwrap()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    fn message(address: Address, domain: &str, chain: u64, issued: i64, extra: &str) -> String {
        format!(
            "{domain} wants you to sign in with your Ethereum account:\n{}\n\nDeploy a token.\n\nURI: https://{domain}/deploy\nVersion: 1\nChain ID: {chain}\nNonce: abcdef123456\nIssued At: {}{extra}",
            address.to_checksum(None),
            at(issued)
        )
    }

    fn signed(key: &PrivateKeySigner, message: String) -> Proof {
        let sig = key.sign_message_sync(message.as_bytes()).unwrap();
        Proof {
            message,
            signature: format!("0x{}", hex::encode(sig.as_bytes())),
        }
    }

    #[test]
    fn a_valid_proof_names_its_signer_and_nonce() {
        let key = PrivateKeySigner::random();
        let p = signed(
            &key,
            message(key.address(), "app.hokus.ai", 31337, NOW - 10, ""),
        );
        let proven = verifier().verify(&p, NOW).unwrap();
        assert_eq!(proven.address, key.address());
        assert_eq!(proven.nonce, "abcdef123456");
        assert_eq!(proven.nonce_ttl_secs, 600 - 10 + 30);
    }

    #[test]
    fn wrong_domain_uri_chain_times_and_signer_are_refused() {
        let key = PrivateKeySigner::random();
        let other = PrivateKeySigner::random();
        let v = verifier();
        let exp = |secs: i64| format!("\nExpiration Time: {}", at(secs));
        let nbf = |secs: i64| format!("\nNot Before: {}", at(secs));
        let cases = [
            (
                "wrong domain",
                signed(&key, message(key.address(), "evil.example", 31337, NOW, "")),
            ),
            (
                "wrong chain",
                signed(&key, message(key.address(), "app.hokus.ai", 1, NOW, "")),
            ),
            (
                "expired",
                signed(
                    &key,
                    message(
                        key.address(),
                        "app.hokus.ai",
                        31337,
                        NOW - 100,
                        &exp(NOW - 60),
                    ),
                ),
            ),
            (
                "not yet valid",
                signed(
                    &key,
                    message(key.address(), "app.hokus.ai", 31337, NOW, &nbf(NOW + 600)),
                ),
            ),
            (
                "too old",
                signed(
                    &key,
                    message(key.address(), "app.hokus.ai", 31337, NOW - 3600, ""),
                ),
            ),
            (
                "signed by another key",
                signed(
                    &other,
                    message(key.address(), "app.hokus.ai", 31337, NOW, ""),
                ),
            ),
        ];
        for (what, p) in cases {
            let e = v.verify(&p, NOW);
            assert!(e.is_err(), "{what} was accepted");
        }
        // The URI must be under the domain.
        let m = message(key.address(), "app.hokus.ai", 31337, NOW, "")
            .replace("https://app.hokus.ai/deploy", "https://evil.example/deploy");
        assert!(v.verify(&signed(&key, m), NOW).is_err());
        // A message changed after signing.
        let mut p = signed(&key, message(key.address(), "app.hokus.ai", 31337, NOW, ""));
        p.message = p.message.replace("Deploy a token.", "Deploy two tokens.");
        assert!(v.verify(&p, NOW).is_err());
        // Not a proof at all: named as a malformed field, not an authentication failure.
        let mut p = signed(&key, message(key.address(), "app.hokus.ai", 31337, NOW, ""));
        p.signature = "0x1234".into();
        assert!(matches!(
            v.verify(&p, NOW),
            Err(ProofError::Malformed {
                field: "siwe_signature",
                ..
            })
        ));
        p.message = "hello".into();
        assert!(matches!(
            v.verify(&p, NOW),
            Err(ProofError::Malformed {
                field: "siwe_message",
                ..
            })
        ));
        // Nothing is accepted without a configured domain.
        let off = Verifier::new(
            SiweSettings {
                domain: None,
                uri: None,
                max_age_secs: 600,
            },
            31337,
            30,
        );
        let good = signed(&key, message(key.address(), "app.hokus.ai", 31337, NOW, ""));
        assert!(off.verify(&good, NOW).is_err());
    }
}
