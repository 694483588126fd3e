//! Generated token symbols (seed 000: "default: auto-generated"; its tests ask for
//! uniqueness). A symbol is `HK-`, up to 8 letters and digits of the model id, and a 4-hex
//! suffix from keccak256 of the id: `model_123456` and `model_123457` share their first 8
//! characters but not their suffix. Uniqueness is not left to the hash: a symbol is reserved
//! for its model in the hash of issued symbols ([`crate::queue::symbols_key`], which the
//! journal also fills with every deployed model's symbol), and when a candidate belongs to
//! another model the next 4 hex digits of the hash are tried. A symbol the caller gives is
//! kept as given.

use alloy::primitives::keccak256;
use fred::prelude::*;

/// Letters and digits of the id kept in the symbol.
const CORE: usize = 8;
/// Candidates tried: 16 suffixes of 4 hex digits (the whole 32-byte hash), then 8 of 8
/// digits. 16 models whose ids share 8 characters and whose suffixes all collide is already
/// a 2^-200 event.
const CANDIDATES: usize = 24;

/// KEYS[1]: the symbols hash. ARGV[1]: the model id, ARGV[2]: "1" to reserve, then the
/// candidates. Returns the first candidate free or already this model's (reserving it), or
/// false.
const SCRIPT: &str = r#"
for i = 3, #ARGV do
  local owner = redis.call('HGET', KEYS[1], ARGV[i])
  if not owner then
    if ARGV[2] == '1' then redis.call('HSET', KEYS[1], ARGV[i], ARGV[1]) end
    return ARGV[i]
  end
  if owner == ARGV[1] then return ARGV[i] end
end
return false
"#;

/// The candidates for `model_id`, in the order they are tried.
pub fn candidates(model_id: &str) -> Vec<String> {
    let core: String = model_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(CORE)
        .collect::<String>()
        .to_ascii_uppercase();
    let core = if core.is_empty() {
        "MODEL".to_owned()
    } else {
        core
    };
    let hex = hex::encode_upper(keccak256(model_id.as_bytes()));
    let short = (0..16).map(|i| &hex[i * 4..i * 4 + 4]);
    let long = (0..8).map(|i| &hex[i * 8..i * 8 + 8]);
    short
        .chain(long)
        .take(CANDIDATES)
        .map(|suffix| format!("HK-{core}-{suffix}"))
        .collect()
}

/// The model's generated symbol; with `reserve` it is recorded as issued to the model (a
/// quote only looks).
pub async fn generated(
    redis: &Client,
    symbols_key: &str,
    model_id: &str,
    reserve: bool,
) -> Result<Option<String>, fred::error::Error> {
    let mut args = vec![
        model_id.to_owned(),
        if reserve { "1" } else { "0" }.to_owned(),
    ];
    args.extend(candidates(model_id));
    redis.eval(SCRIPT, vec![symbols_key.to_owned()], args).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_share_a_prefix_get_different_symbols() {
        let a = &candidates("model_123456")[0];
        let b = &candidates("model_123457")[0];
        assert!(a.starts_with("HK-MODEL123-") && b.starts_with("HK-MODEL123-"));
        assert_ne!(a, b);
        assert_eq!(candidates("___")[0].len(), "HK-MODEL-0000".len());
        // Every candidate passes the message rules for symbols (letters and digits in groups).
        for c in candidates("a-very-long-model-name") {
            assert!(c.len() <= 20 && c.split('-').all(|g| !g.is_empty()), "{c}");
        }
        // Deterministic: a retry of the same model asks for the same symbol.
        assert_eq!(candidates("model_7"), candidates("model_7"));
    }
}
