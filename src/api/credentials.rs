//! Who is calling the API: a JWT (`Authorization: Bearer`, or `auth_token` in the body as seed
//! 000 shows it) or a static service key (`X-API-Key`, seeds 002 and 003).
//!
//! Tokens are checked with `jsonwebtoken`: the algorithm must be one configured
//! (`api.jwt.algorithms`) and match the kind of key configured for it (an HMAC secret for HS*,
//! a PEM public key for RS*/PS*/ES*), so `alg: none` and algorithm confusion (an RS256 public
//! key used as an HS256 secret) are refused. `exp` is required; `nbf`, `iss` and `aud` are
//! checked when present or configured; `jti` is required with `api.jwt.require_jti`. Every
//! refusal is one error with a reason for the log; the client only learns that authentication
//! failed.

use std::str::FromStr;

use alloy::primitives::Address;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::{ConfigError, Settings};

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// The token's `sub`, or `service:<key id>` for a service key.
    pub user_id: String,
    /// The token's Ethereum address claim, if any: an address the caller has proven (the
    /// token's issuer vouches for it).
    pub address: Option<Address>,
    /// The token's `jti`: with one, the token is good for one deployment request.
    pub jti: Option<String>,
    /// The token's `exp` (unix seconds); 0 for a service key.
    pub expires_at: u64,
    /// Rate-limit tier from the token (`tier` claim); `service` for service keys.
    pub tier: Option<String>,
    /// True for a service key: the body's `user_address` is taken as given.
    pub service: bool,
}

/// Why a credential was refused: logged, never sent to the client.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, alias = "eth_address", alias = "wallet_address")]
    address: Option<String>,
    #[serde(default)]
    tier: Option<String>,
    #[serde(default)]
    jti: Option<String>,
    exp: u64,
}

pub struct Authenticator {
    /// Per accepted algorithm, its key and validation rules.
    keys: Vec<(Algorithm, DecodingKey, Validation)>,
    /// SHA-256 of each service key.
    service_keys: Vec<[u8; 32]>,
    /// `api.jwt.require_jti`.
    require_jti: bool,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Equal digests, compared without an early exit.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    pub fn new(settings: &Settings) -> Result<Authenticator, ConfigError> {
        let bad = |reason: String| ConfigError::Invalid {
            key: "api.jwt.algorithms",
            reason,
        };
        let jwt = &settings.api.jwt;
        let pem = match &jwt.public_key_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| ConfigError::File {
                key: "api.jwt.public_key_file",
                path: path.clone(),
                source,
            })?),
            None => None,
        };
        let mut keys = Vec::new();
        for name in &jwt.algorithms {
            let alg = Algorithm::from_str(name)
                .map_err(|_| bad(format!("`{name}` is not a JWT algorithm")))?;
            let key = match alg {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    let secret = jwt
                        .secret
                        .as_ref()
                        .ok_or_else(|| bad(format!("{name} needs api.jwt.secret (JWT_SECRET)")))?;
                    if secret.expose().len() < 32 {
                        return Err(ConfigError::Invalid {
                            key: "api.jwt.secret",
                            reason: "must be at least 32 characters".into(),
                        });
                    }
                    DecodingKey::from_secret(secret.expose().as_bytes())
                }
                Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512 => {
                    let pem = pem
                        .as_ref()
                        .ok_or_else(|| bad(format!("{name} needs api.jwt.public_key_file")))?;
                    DecodingKey::from_rsa_pem(pem).map_err(|e| ConfigError::Invalid {
                        key: "api.jwt.public_key_file",
                        reason: format!("not an RSA public key in PEM: {e}"),
                    })?
                }
                Algorithm::ES256 | Algorithm::ES384 => {
                    let pem = pem
                        .as_ref()
                        .ok_or_else(|| bad(format!("{name} needs api.jwt.public_key_file")))?;
                    DecodingKey::from_ec_pem(pem).map_err(|e| ConfigError::Invalid {
                        key: "api.jwt.public_key_file",
                        reason: format!("not an EC public key in PEM: {e}"),
                    })?
                }
                Algorithm::EdDSA => return Err(bad("EdDSA is not supported".into())),
            };
            let mut v = Validation::new(alg);
            v.leeway = jwt.leeway_secs;
            v.validate_nbf = true;
            v.set_required_spec_claims(&["exp", "sub"]);
            match &jwt.issuer {
                Some(iss) => v.set_issuer(&[iss]),
                None => v.iss = None,
            }
            match &jwt.audience {
                Some(aud) => v.set_audience(&[aud]),
                None => v.validate_aud = false,
            }
            keys.push((alg, key, v));
        }
        Ok(Authenticator {
            keys,
            service_keys: settings
                .api_keys()
                .iter()
                .map(|k| digest(k.expose()))
                .collect(),
            require_jti: jwt.require_jti,
        })
    }

    /// Checks a bearer token.
    pub fn jwt(&self, token: &str) -> Result<Caller, Refused> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| Refused(format!("bad token: {e}")))?;
        let (_, key, validation) = self
            .keys
            .iter()
            .find(|(alg, _, _)| *alg == header.alg)
            .ok_or_else(|| Refused(format!("algorithm {:?} is not accepted", header.alg)))?;
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| Refused(format!("token refused: {e}")))?;
        let c = data.claims;
        if c.sub.trim().is_empty() || c.sub.len() > 128 {
            return Err(Refused("`sub` is empty or longer than 128".into()));
        }
        let address = c
            .address
            .map(|a| {
                a.parse::<Address>()
                    .map_err(|_| Refused("`address` claim is not an Ethereum address".into()))
            })
            .transpose()?;
        let jti = c.jti.filter(|j| !j.is_empty());
        if jti.as_ref().is_some_and(|j| j.len() > 256) {
            return Err(Refused("`jti` is longer than 256".into()));
        }
        if self.require_jti && jti.is_none() {
            return Err(Refused(
                "`jti` is missing and api.jwt.require_jti is set".into(),
            ));
        }
        Ok(Caller {
            user_id: c.sub,
            address,
            tier: c.tier,
            service: false,
            jti,
            expires_at: c.exp,
        })
    }

    /// Checks a service key.
    pub fn service_key(&self, key: &str) -> Result<Caller, Refused> {
        let d = digest(key);
        if self.service_keys.iter().any(|k| same(k, &d)) {
            Ok(Caller {
                user_id: format!("service:{}", hex::encode(&d[..4])),
                address: None,
                tier: Some("service".into()),
                service: true,
                jti: None,
                expires_at: 0,
            })
        } else {
            Err(Refused("unknown API key".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sources;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn auth(extra: &[(&str, &str)]) -> Authenticator {
        let mut env: Vec<(String, String)> = vec![
            ("HOKUSAI__API__JWT__SECRET".into(), SECRET.into()),
            (
                "HOKUSAI__API__JWT__AUDIENCE".into(),
                "hokusai-deployer".into(),
            ),
            (
                "HOKUSAI__API__JWT__ISSUER".into(),
                "https://hokus.ai".into(),
            ),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let s = Settings::load(Sources { file: None, env }).unwrap();
        Authenticator::new(&s).unwrap()
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn good() -> serde_json::Value {
        serde_json::json!({
            "sub": "user-1",
            "address": "0x742d35cc6634c0532925a3b844bc9e7595f82b3d",
            "tier": "premium",
            "exp": now() + 600,
            "iss": "https://hokus.ai",
            "aud": "hokusai-deployer",
        })
    }

    #[test]
    fn a_valid_token_names_the_caller() {
        let c = auth(&[])
            .jwt(&token(good(), Algorithm::HS256, SECRET.as_bytes()))
            .unwrap();
        assert_eq!(c.user_id, "user-1");
        assert_eq!(c.tier.as_deref(), Some("premium"));
        assert!(c.address.is_some());
    }

    #[test]
    fn forged_expired_early_foreign_and_unsigned_tokens_are_refused() {
        let a = auth(&[]);
        let with = |k: &str, v: serde_json::Value| {
            let mut c = good();
            c[k] = v;
            c
        };
        let cases = [
            (
                "forged",
                token(
                    good(),
                    Algorithm::HS256,
                    b"another-secret-of-32-characters!!",
                ),
            ),
            (
                "expired",
                token(
                    with("exp", (now() - 3600).into()),
                    Algorithm::HS256,
                    SECRET.as_bytes(),
                ),
            ),
            (
                "not yet valid",
                token(
                    with("nbf", (now() + 3600).into()),
                    Algorithm::HS256,
                    SECRET.as_bytes(),
                ),
            ),
            (
                "wrong audience",
                token(
                    with("aud", "someone-else".into()),
                    Algorithm::HS256,
                    SECRET.as_bytes(),
                ),
            ),
            (
                "wrong issuer",
                token(
                    with("iss", "https://evil".into()),
                    Algorithm::HS256,
                    SECRET.as_bytes(),
                ),
            ),
            (
                "algorithm not configured",
                token(good(), Algorithm::HS512, SECRET.as_bytes()),
            ),
            (
                "bad address",
                token(
                    with("address", "0x12".into()),
                    Algorithm::HS256,
                    SECRET.as_bytes(),
                ),
            ),
        ];
        for (what, t) in cases {
            assert!(a.jwt(&t).is_err(), "{what} was accepted");
        }
        // No expiry at all.
        let mut c = good();
        c.as_object_mut().unwrap().remove("exp");
        assert!(a
            .jwt(&token(c, Algorithm::HS256, SECRET.as_bytes()))
            .is_err());
        // `alg: none`: header and claims, no signature.
        use base64::Engine;
        let b64 = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none","typ":"JWT"}"#),
            b64(good().to_string().as_bytes())
        );
        assert!(a.jwt(&none).is_err(), "alg none was accepted");
    }

    fn keyed(algorithms: &str, public_key: &str, secret: Option<&str>) -> Authenticator {
        let path = format!("{}/tests/data/jwt/{public_key}", env!("CARGO_MANIFEST_DIR"));
        let mut env: Vec<(String, String)> = vec![
            ("HOKUSAI__API__JWT__ALGORITHMS".into(), algorithms.into()),
            ("HOKUSAI__API__JWT__PUBLIC_KEY_FILE".into(), path),
        ];
        if let Some(s) = secret {
            env.push(("HOKUSAI__API__JWT__SECRET".into(), s.into()));
        }
        Authenticator::new(&Settings::load(Sources { file: None, env }).unwrap()).unwrap()
    }

    fn pem(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/data/jwt/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn claims_only() -> serde_json::Value {
        serde_json::json!({ "sub": "user-1", "exp": now() + 600 })
    }

    #[test]
    fn rs256_and_es256_tokens_verify_with_the_public_key() {
        let rs = encode(
            &Header::new(Algorithm::RS256),
            &claims_only(),
            &EncodingKey::from_rsa_pem(&pem("rsa-private.pem")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            keyed("RS256", "rsa-public.pem", None)
                .jwt(&rs)
                .unwrap()
                .user_id,
            "user-1"
        );
        let es = encode(
            &Header::new(Algorithm::ES256),
            &claims_only(),
            &EncodingKey::from_ec_pem(&pem("ec-private.pem")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            keyed("ES256", "ec-public.pem", None)
                .jwt(&es)
                .unwrap()
                .user_id,
            "user-1"
        );
        // An ES256 token where RS256 is configured.
        assert!(keyed("RS256", "rsa-public.pem", None).jwt(&es).is_err());
    }

    /// The classic confusion: an HS256 token whose HMAC key is the server's RSA public key.
    #[test]
    fn a_token_signed_with_the_public_key_as_hmac_secret_is_refused() {
        let public = pem("rsa-public.pem");
        let forged = token(claims_only(), Algorithm::HS256, &public);
        assert!(keyed("RS256", "rsa-public.pem", None).jwt(&forged).is_err());
        // Even with HS256 accepted too, its key is the configured secret, never the PEM.
        let both = keyed("RS256,HS256", "rsa-public.pem", Some(SECRET));
        assert!(both.jwt(&forged).is_err());
        assert!(both
            .jwt(&token(claims_only(), Algorithm::HS256, SECRET.as_bytes()))
            .is_ok());
    }

    #[test]
    fn a_token_without_jti_is_refused_only_when_jti_is_required() {
        let t = token(good(), Algorithm::HS256, SECRET.as_bytes());
        assert_eq!(auth(&[]).jwt(&t).unwrap().jti, None);
        let strict = auth(&[("HOKUSAI__API__JWT__REQUIRE_JTI", "true")]);
        assert!(strict.jwt(&t).is_err());
        let mut c = good();
        c["jti"] = "id-1".into();
        let with = strict
            .jwt(&token(c, Algorithm::HS256, SECRET.as_bytes()))
            .unwrap();
        assert_eq!(with.jti.as_deref(), Some("id-1"));
        assert!(with.expires_at > now());
    }

    #[test]
    fn service_keys_are_recognised_exactly() {
        let a = auth(&[("HOKUSAI__API__API_KEYS", "key-one-123456, key-two-654321")]);
        assert!(a.service_key("key-two-654321").unwrap().service);
        assert!(a.service_key("key-two-65432").is_err());
        assert!(a.service_key("").is_err());
    }

    #[test]
    fn a_short_secret_or_a_missing_key_is_a_configuration_error() {
        let s = Settings::load(Sources {
            file: None,
            env: vec![("HOKUSAI__API__JWT__SECRET".into(), "short".into())],
        })
        .unwrap();
        assert!(Authenticator::new(&s).is_err());
        let s = Settings::load(Sources {
            file: None,
            env: vec![("HOKUSAI__API__JWT__ALGORITHMS".into(), "RS256".into())],
        })
        .unwrap();
        let e = Authenticator::new(&s).err().unwrap().to_string();
        assert!(e.contains("public_key_file"), "{e}");
    }
}
