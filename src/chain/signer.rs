//! Deployer keys: a local private key, or a key in AWS KMS (feature `aws-kms`) through alloy's
//! AWS signer.

use alloy::network::EthereumWallet;
use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;

use super::ChainError;
use crate::config::{DeployerKey, Secret, Settings};

pub fn signer(key: &Secret) -> Result<PrivateKeySigner, ChainError> {
    key.expose()
        .trim()
        .parse::<PrivateKeySigner>()
        .map_err(|_| ChainError::BadKey("not a 32-byte hex private key".into()))
}

/// A deployer key made usable: its address and a wallet that signs with it.
#[derive(Clone)]
pub struct Wallet {
    pub address: Address,
    pub(super) wallet: EthereumWallet,
    /// Signs over the network (KMS): its failures are retried, not the message's fault.
    pub(super) remote: bool,
}

impl Wallet {
    /// Resolves the pool's keys in order, going on after those already in `done` (so a retry
    /// after a KMS failure keeps what it had). A local key is parsed; a KMS key's public key is
    /// fetched (one `GetPublicKey`), with one AWS client for the whole pool.
    pub async fn resolve_pool(
        keys: &[DeployerKey],
        settings: &Settings,
        done: &mut Vec<Wallet>,
    ) -> Result<(), ChainError> {
        let mut kms = None;
        for key in &keys[done.len().min(keys.len())..] {
            let wallet = match key {
                DeployerKey::Local(secret) => {
                    let s = signer(secret)?;
                    Wallet {
                        address: s.address(),
                        wallet: EthereumWallet::from(s),
                        remote: false,
                    }
                }
                DeployerKey::AwsKms(id) => aws_kms(id, settings, &mut kms).await?,
            };
            done.push(wallet);
        }
        Ok(())
    }
}

#[cfg(feature = "aws-kms")]
type KmsClient = alloy::signers::aws::aws_sdk_kms::Client;
#[cfg(not(feature = "aws-kms"))]
type KmsClient = ();

/// AWS KMS through alloy's signer. Region, credentials and endpoint come from the AWS
/// environment (`AWS_REGION`, the ECS task role, IRSA, `AWS_ENDPOINT_URL`, ...), loaded once
/// into `client`; every KMS call is bounded by `chain.rpc_timeout_ms`, after the SDK's own
/// retries.
#[cfg(feature = "aws-kms")]
async fn aws_kms(
    id: &str,
    settings: &Settings,
    client: &mut Option<KmsClient>,
) -> Result<Wallet, ChainError> {
    use alloy::network::TxSigner;
    use alloy::signers::aws::{aws_config, AwsSigner};

    let kms = match client {
        Some(c) => c.clone(),
        None => {
            let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .timeout_config(
                    aws_config::timeout::TimeoutConfig::builder()
                        .operation_timeout(settings.rpc_timeout())
                        .build(),
                )
                .load()
                .await;
            client.insert(KmsClient::new(&conf)).clone()
        }
    };
    let signer = AwsSigner::new(kms, id.to_owned(), None)
        .await
        .map_err(|e| ChainError::RemoteSigner(format!("AWS KMS key {id}: {}", error_chain(&e))))?;
    Ok(Wallet {
        address: TxSigner::address(&signer),
        wallet: EthereumWallet::from(signer),
        remote: true,
    })
}

/// Configuration refuses KMS keys in a build without the feature; this is never reached.
#[cfg(not(feature = "aws-kms"))]
async fn aws_kms(id: &str, _: &Settings, _: &mut Option<KmsClient>) -> Result<Wallet, ChainError> {
    Err(ChainError::BadKey(format!(
        "chain.aws_kms_key_ids names {id}, but this build has no AWS KMS support"
    )))
}

/// An error and its sources, `: `-joined: the AWS SDK's top-level message alone is terse
/// ("service error").
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}
