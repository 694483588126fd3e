//! The contracts: the token manager deploys a model's token (an EIP-1167 clone of one
//! `HokusaiToken` implementation at a CREATE2 address derived from the model id) and registers
//! it in one transaction; the address is predicted here before anything is sent. Also the role
//! checks the worker and readiness make, and the bootstrap of a fresh chain.

use alloy::network::EthereumWallet;
use alloy::primitives::{hex, keccak256, Address, B256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::sol_types::{SolCall, SolValue};

use super::{provider, signer, Call, Chain, ChainError, HokusaiToken, ModelRegistry, TokenManager};
use crate::config::{Secret, Settings};
use crate::message::ModelReady;

/// EIP-1167 creation code around the implementation's address (OpenZeppelin 5 `Clones`).
const CLONE_PREFIX: [u8; 20] = hex!("3d602d80600a3d3981f3363d3d373d3d3d363d73");
const CLONE_SUFFIX: [u8; 15] = hex!("5af43d82803e903d91602b57fd5bf3");

/// What predicts a model's token address: the manager (the CREATE2 deployer), the token
/// implementation the clones point at, and the namespace mixed into every salt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenFactory {
    pub manager: Address,
    pub implementation: Address,
    pub namespace: B256,
}

impl TokenFactory {
    /// Reads the implementation and namespace from the manager (once, at start-up).
    pub async fn read(
        provider: &DynProvider,
        manager: Address,
    ) -> Result<TokenFactory, ChainError> {
        let m = TokenManager::new(manager, provider);
        let (implementation, namespace) = (m.tokenImplementation(), m.namespace());
        let (implementation, namespace) = tokio::try_join!(implementation.call(), namespace.call())
            .map_err(|e| match e {
                // The RPC is down: that may pass.
                alloy::contract::Error::TransportError(ref t) if !super::is_revert(t) => {
                    ChainError::Call(e)
                }
                e => ChainError::NotOurManager {
                    address: manager,
                    reason: e.to_string(),
                },
            })?;
        Ok(TokenFactory {
            manager,
            implementation,
            namespace,
        })
    }

    /// The CREATE2 salt of a model's token: keccak256(abi.encode(namespace, modelId)), as
    /// `TokenManager.saltOf`.
    pub fn salt(&self, model_id: &str) -> B256 {
        keccak256((self.namespace, model_id.to_owned()).abi_encode_params())
    }

    /// The address `deployToken(model_id, ...)` creates, as `TokenManager.predictToken`.
    pub fn predict(&self, model_id: &str) -> Address {
        let mut code = Vec::with_capacity(55);
        code.extend_from_slice(&CLONE_PREFIX);
        code.extend_from_slice(self.implementation.as_slice());
        code.extend_from_slice(&CLONE_SUFFIX);
        self.manager.create2_from_code(self.salt(model_id), code)
    }
}

/// Gas of one `deployToken` as measured on anvil (clone, initialization, registration, with
/// a 30-character id, name and symbol); quotes use it, with `chain.gas_limit_margin_percent`,
/// because only a deployer can simulate the call. The worker estimates every transaction.
pub const DEPLOY_TOKEN_GAS: u64 = 260_000;

/// The namespace a `contracts deploy` without `--namespace` gives its manager.
pub const NO_NAMESPACE: B256 = B256::ZERO;

impl Chain {
    /// How many messages to have in flight: two blocks' worth of deployments (a message is in
    /// flight for about one block, from its signature to its receipt, so two keep every block
    /// full while the last one's receipts are read), from the latest block's gas limit and
    /// the gas of one `deployToken`, never more than `cap` (`pipeline.concurrency`). The
    /// chain decides, not a fixed count: 30 M-gas blocks hold about 115 models.
    pub async fn in_flight_bound(&self, cap: usize) -> usize {
        let gas_limit = match self
            .provider
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await
        {
            Ok(Some(b)) => b.header.gas_limit,
            // Unknown: the cap decides.
            _ => return cap.max(1),
        };
        in_flight_bound(gas_limit, cap)
    }

    /// The token a model is registered with, if any: the chain's final word on duplicates.
    pub async fn registered_token(&self, model_id: &str) -> Result<Option<Address>, ChainError> {
        let reg = ModelRegistry::new(self.registry, &self.provider);
        let token = reg.getToken(model_id.to_owned()).call().await?;
        Ok((token != Address::ZERO).then_some(token))
    }

    /// The one transaction of a model: `TokenManager.deployToken`, which clones the token,
    /// initializes it with the manager as controller and registers it.
    pub fn deploy_token_call(&self, model: &ModelReady) -> Call {
        Call {
            to: self.manager,
            data: TokenManager::deployTokenCall {
                modelId: model.model_id.clone(),
                name: model.token_name.clone(),
                symbol: model.chain_symbol.clone(),
                performanceMetric: model.metric_name.clone(),
            }
            .abi_encode()
            .into(),
        }
    }
}

/// Two blocks' worth of `deployToken` transactions in a block of `gas_limit`, under `cap`.
pub fn in_flight_bound(gas_limit: u64, cap: usize) -> usize {
    let per_block = (gas_limit / DEPLOY_TOKEN_GAS).max(1) as usize;
    (2 * per_block).min(cap).max(1)
}

/// The roles a worker needs, with what grants a missing one: the manager wired to the
/// registry and a registrar of it, and `signer` a deployer of the manager. Start-up and
/// readiness ask it.
pub async fn check_roles(
    provider: &DynProvider,
    registry: Address,
    manager: Address,
    signer: Address,
) -> Result<(), ChainError> {
    let reg = ModelRegistry::new(registry, provider);
    let man = TokenManager::new(manager, provider);
    // The wiring first: a wrong registry address is then named, not a raw call failure.
    let wired = man.registry().call().await?;
    if wired != registry {
        return Err(ChainError::MissingRole(format!(
            "the token manager {manager} uses registry {wired}, not chain.model_registry_address {registry}: set chain.model_registry_address to {wired}, or deploy a matching pair (`hokusai-deployer contracts deploy`)"
        )));
    }
    // An interface probe: only a ModelRegistry answers `registrars`.
    let registrar = reg.registrars(manager).call().await.map_err(|e| match e {
        alloy::contract::Error::TransportError(t) if !super::is_revert(&t) => {
            ChainError::Call(alloy::contract::Error::TransportError(t))
        }
        e => ChainError::NotOurRegistry {
            address: registry,
            reason: e.to_string(),
        },
    })?;
    let deployer = man.deployers(signer).call().await?;
    if !registrar {
        return Err(ChainError::MissingRole(format!(
            "the token manager {manager} is not a registrar of the registry {registry}: its owner must call setRegistrar({manager}, true)"
        )));
    }
    if !deployer {
        return Err(ChainError::MissingRole(format!(
            "the signer {signer} is not a deployer of the token manager {manager}: its owner must call setDeployer({signer}, true), or bootstrap with `hokusai-deployer contracts deploy --deployer {signer}`"
        )));
    }
    Ok(())
}

/// Addresses of a fresh deployment: the token implementation, the registry and the manager.
#[derive(Debug, serde::Serialize)]
pub struct Bootstrap {
    pub chain_id: u64,
    pub token_implementation: Address,
    pub model_registry: Address,
    pub token_manager: Address,
    /// The key that deployed and owns them.
    pub deployer: Address,
    /// Addresses allowed to call `deployToken`: the deployer and the `--deployer` ones.
    pub deployers: Vec<Address>,
    pub namespace: B256,
}

/// Deploys the token implementation, `ModelRegistry` and `TokenManager`, makes the manager a
/// registrar and the deployer key and `deployers` deployers of the manager.
pub async fn bootstrap(
    settings: &Settings,
    key: &Secret,
    deployers: &[Address],
    namespace: B256,
) -> Result<Bootstrap, ChainError> {
    let signer = signer(key)?;
    let deployer = signer.address();
    // The same transport as the worker's (failover, timeouts), with a wallet on top.
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(signer))
        .connect_provider(provider(settings)?);
    let chain_id = provider.get_chain_id().await?;
    // The implementation initializes itself in its constructor, so nobody can later.
    let implementation = HokusaiToken::deploy(
        &provider,
        "Hokusai token implementation".into(),
        "HOKUSAI-IMPL".into(),
        deployer,
    )
    .await?;
    let registry = ModelRegistry::deploy(&provider).await?;
    let manager = TokenManager::deploy(
        &provider,
        *registry.address(),
        *implementation.address(),
        namespace,
    )
    .await?;
    let mine = |r: Result<_, alloy::contract::Error>| async move {
        let pending: alloy::providers::PendingTransactionBuilder<_> = r?;
        pending
            .get_receipt()
            .await
            .map_err(|e| ChainError::Refused(e.to_string()))
    };
    mine(registry.setRegistrar(*manager.address(), true).send().await).await?;
    let mut all = vec![deployer];
    all.extend(deployers.iter().copied().filter(|d| *d != deployer));
    for d in &all {
        mine(manager.setDeployer(*d, true).send().await).await?;
    }
    Ok(Bootstrap {
        chain_id,
        token_implementation: *implementation.address(),
        model_registry: *registry.address(),
        token_manager: *manager.address(),
        deployer,
        deployers: all,
        namespace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_in_flight_bound_follows_the_block_gas_limit_under_the_cap() {
        // anvil and mainnet-sized blocks: 115 models each, two blocks' worth.
        assert_eq!(in_flight_bound(30_000_000, 512), 230);
        assert_eq!(in_flight_bound(30_000_000, 64), 64);
        // A tiny block still lets one through.
        assert_eq!(in_flight_bound(100_000, 512), 2);
        assert_eq!(in_flight_bound(0, 0), 1);
    }
}
