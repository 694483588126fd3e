//! Fees: what the network asks per gas ([`Market`]), the fees of a new transaction under the
//! cap, and the raise a replacement needs.

use alloy::consensus::{Transaction as _, TxEnvelope};
use alloy::providers::{DynProvider, Provider};

use super::ChainError;

/// What the network asks per gas right now.
#[derive(Debug, Clone, Copy)]
pub enum Market {
    Eip1559 { base: u128, priority: u128 },
    Legacy { gas_price: u128 },
}

impl Market {
    /// Base fee and priority fee (`priority_fee` in wei, else the 20th percentile of recent
    /// tips from `eth_feeHistory`), or the legacy gas price on chains without a base fee.
    pub async fn read(
        provider: &DynProvider,
        priority_fee: Option<u128>,
    ) -> Result<Market, ChainError> {
        Ok(match priority_fee {
            Some(priority) => {
                let latest = provider
                    .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
                    .await?;
                match latest.and_then(|b| b.header.base_fee_per_gas) {
                    Some(base) => Market::Eip1559 {
                        base: u128::from(base),
                        priority,
                    },
                    None => Market::Legacy {
                        gas_price: provider.get_gas_price().await?,
                    },
                }
            }
            None => match provider.estimate_eip1559_fees().await {
                // alloy's estimate is 2 x base fee + priority fee.
                Ok(f) => Market::Eip1559 {
                    base: f.max_fee_per_gas.saturating_sub(f.max_priority_fee_per_gas) / 2,
                    priority: f.max_priority_fee_per_gas,
                },
                // A chain without EIP-1559 has no base fee: price the legacy way.
                Err(_) => Market::Legacy {
                    gas_price: provider.get_gas_price().await?,
                },
            },
        })
    }

    /// The base fee (the gas price on legacy chains).
    pub fn base(self) -> u128 {
        match self {
            Market::Eip1559 { base, .. } => base,
            Market::Legacy { gas_price } => gas_price,
        }
    }

    /// Fees for a new transaction: max fee = 2 x base fee + priority fee (room for six full
    /// blocks of base fee rises). Under `cap` the max fee is lowered to the cap while base fee
    /// plus priority fee still fit; otherwise [`ChainError::FeeAboveCap`].
    pub fn fees(self, cap: Option<u128>) -> Result<Fees, ChainError> {
        let gwei = |wei: u128| wei as f64 / 1e9;
        match self {
            Market::Eip1559 { base, priority } => {
                let mut max_fee = 2 * base + priority;
                if let Some(cap) = cap {
                    if base + priority > cap {
                        return Err(ChainError::FeeAboveCap {
                            needed_gwei: gwei(base + priority),
                            cap_gwei: gwei(cap),
                        });
                    }
                    max_fee = max_fee.min(cap);
                }
                Ok(Fees::Eip1559 { max_fee, priority })
            }
            Market::Legacy { gas_price } => match cap {
                Some(cap) if gas_price > cap => Err(ChainError::FeeAboveCap {
                    needed_gwei: gwei(gas_price),
                    cap_gwei: gwei(cap),
                }),
                _ => Ok(Fees::Legacy { gas_price }),
            },
        }
    }
}

/// Fees for replacing `old`: each raised by `bump_percent` (what nodes require of a
/// replacement) or to the current market if that is higher, within `cap`. `None` when the cap
/// leaves no room for the raise.
pub(super) fn replacement_fees(
    old: &TxEnvelope,
    market: Market,
    bump_percent: u128,
    cap: Option<u128>,
) -> Option<Fees> {
    let bump = |x: u128| x + (x * bump_percent).div_ceil(100);
    let cap = cap.unwrap_or(u128::MAX);
    if old.is_dynamic_fee() {
        let (base, tip) = match market {
            Market::Eip1559 { base, priority } => (base, priority),
            Market::Legacy { gas_price } => (gas_price, 0),
        };
        let min_tip = bump(old.max_priority_fee_per_gas().unwrap_or(0));
        let min_max = bump(old.max_fee_per_gas());
        let priority = min_tip.max(tip);
        let max_fee = min_max.max(2 * base + priority).min(cap);
        let priority = priority.min(max_fee);
        (max_fee >= min_max && priority >= min_tip).then_some(Fees::Eip1559 { max_fee, priority })
    } else {
        let current = match market {
            Market::Eip1559 { base, priority } => base + priority,
            Market::Legacy { gas_price } => gas_price,
        };
        let min_price = bump(old.gas_price().unwrap_or_default());
        let gas_price = min_price.max(current).min(cap);
        (gas_price >= min_price).then_some(Fees::Legacy { gas_price })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fees {
    Eip1559 { max_fee: u128, priority: u128 },
    Legacy { gas_price: u128 },
}

impl Fees {
    /// The most a transaction with these fees pays per gas.
    pub fn max_fee_per_gas(self) -> u128 {
        match self {
            Fees::Eip1559 { max_fee, .. } => max_fee,
            Fees::Legacy { gas_price } => gas_price,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::local::PrivateKeySigner;

    fn signed_1559(max_fee: u128, tip: u128) -> TxEnvelope {
        use alloy::consensus::{SignableTransaction, TxEip1559};
        use alloy::network::TxSignerSync;
        let mut tx = TxEip1559 {
            chain_id: 31337,
            nonce: 7,
            gas_limit: 900_000,
            max_fee_per_gas: max_fee,
            max_priority_fee_per_gas: tip,
            ..Default::default()
        };
        let key = PrivateKeySigner::random();
        let sig = key.sign_transaction_sync(&mut tx).unwrap();
        TxEnvelope::Eip1559(tx.into_signed(sig))
    }

    const GWEI: u128 = 1_000_000_000;

    #[test]
    fn a_replacement_raises_both_fees_by_the_bump_or_to_the_market() {
        let old = signed_1559(100 * GWEI, 2 * GWEI);
        // The market is cheaper than the old transaction: the bump decides.
        let calm = Market::Eip1559 {
            base: 10 * GWEI,
            priority: GWEI,
        };
        assert_eq!(
            replacement_fees(&old, calm, 15, None),
            Some(Fees::Eip1559 {
                max_fee: 115 * GWEI,
                priority: 2_300_000_000,
            })
        );
        // The base fee ran away: the market decides (2 x base + tip).
        let busy = Market::Eip1559 {
            base: 100 * GWEI,
            priority: 3 * GWEI,
        };
        assert_eq!(
            replacement_fees(&old, busy, 15, None),
            Some(Fees::Eip1559 {
                max_fee: 203 * GWEI,
                priority: 3 * GWEI,
            })
        );
        // Under a cap: lowered to it while the bump still fits, refused when it does not.
        assert_eq!(
            replacement_fees(&old, busy, 15, Some(150 * GWEI)),
            Some(Fees::Eip1559 {
                max_fee: 150 * GWEI,
                priority: 3 * GWEI,
            })
        );
        assert_eq!(replacement_fees(&old, busy, 15, Some(110 * GWEI)), None);
    }

    #[test]
    fn a_legacy_replacement_raises_the_gas_price() {
        use alloy::consensus::{SignableTransaction, TxLegacy};
        use alloy::network::TxSignerSync;
        let mut tx = TxLegacy {
            chain_id: Some(137),
            nonce: 3,
            gas_price: 40 * GWEI,
            gas_limit: 900_000,
            ..Default::default()
        };
        let sig = PrivateKeySigner::random()
            .sign_transaction_sync(&mut tx)
            .unwrap();
        let old = TxEnvelope::Legacy(tx.into_signed(sig));
        let market = Market::Legacy {
            gas_price: 30 * GWEI,
        };
        assert_eq!(
            replacement_fees(&old, market, 13, None),
            Some(Fees::Legacy {
                gas_price: 45_200_000_000
            })
        );
        assert_eq!(replacement_fees(&old, market, 13, Some(45 * GWEI)), None);
    }
}
