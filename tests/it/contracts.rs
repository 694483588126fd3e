//! The contracts on anvil: only the controller mints, only registrars register, duplicates and
//! code-less tokens revert, the owner moves control.
//!
//! Expected reverts are checked with `eth_call`: a failed `send()` would still advance alloy's
//! cached nonce and leave a gap that stalls every later transaction of that account.

use alloy::contract::{CallBuilder, CallDecoder};
use alloy::network::EthereumWallet;
use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionReceipt;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use hokusai_deployer::chain::contracts::TokenFactory;
use hokusai_deployer::chain::{HokusaiToken, ModelRegistry, TokenManager};
use hokusai_deployer::localstack::ANVIL_DEV_KEY;

use crate::harness::Stack;

/// anvil's third development account (public test key): the stack authorises the second one
/// as a registrar, so the stranger here must be another.
const OTHER_KEY: &str = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";

/// Sends a transaction that must succeed and waits for its receipt.
trait Mine {
    async fn mine(self) -> TransactionReceipt;
}

impl<P: Provider, D: CallDecoder> Mine for CallBuilder<P, D> {
    async fn mine(self) -> TransactionReceipt {
        self.send().await.unwrap().get_receipt().await.unwrap()
    }
}

fn wallet_provider(stack: &Stack, key: &str) -> (DynProvider, Address) {
    let signer: PrivateKeySigner = key.parse().unwrap();
    let addr = signer.address();
    let p = ProviderBuilder::new()
        .wallet(EthereumWallet::from(signer))
        .connect_http(stack.anvil.url("http").parse().unwrap())
        .erased();
    (p, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_registry_and_manager_enforce_their_roles() {
    let stack = Stack::start().await;
    let (owner, owner_addr) = wallet_provider(&stack, ANVIL_DEV_KEY);
    let (other, other_addr) = wallet_provider(&stack, OTHER_KEY);
    let manager_addr = stack.boot.token_manager;

    // The token: controller set and announced at construction.
    let token = HokusaiToken::deploy(&owner, "Hokusai m1".into(), "M1".into(), manager_addr)
        .await
        .unwrap();
    assert_eq!(token.controller().call().await.unwrap(), manager_addr);
    assert_eq!(token.owner().call().await.unwrap(), owner_addr);
    let deploy_tx = token
        .provider()
        .get_transaction_count(owner_addr)
        .await
        .unwrap();
    assert!(deploy_tx > 0);

    // Only the controller mints or burns: neither the owner nor anyone else.
    for p in [&owner, &other] {
        let t = HokusaiToken::new(*token.address(), p);
        let err = t.mint(other_addr, U256::from(1)).call().await.unwrap_err();
        let decoded = err.as_decoded_interface_error::<HokusaiToken::HokusaiTokenErrors>();
        assert!(
            matches!(
                decoded,
                Some(HokusaiToken::HokusaiTokenErrors::NotController(_))
            ),
            "{err}"
        );
        assert!(t.burn(owner_addr, U256::from(1)).call().await.is_err());
    }

    // Only registrars register; the owner can add one.
    let reg_other = ModelRegistry::new(stack.boot.model_registry, &other);
    let err = reg_other
        .registerModel("m1".into(), *token.address(), "accuracy".into())
        .call()
        .await
        .unwrap_err();
    assert!(matches!(
        err.as_decoded_interface_error::<ModelRegistry::ModelRegistryErrors>(),
        Some(ModelRegistry::ModelRegistryErrors::NotRegistrar(_))
    ));
    let reg = ModelRegistry::new(stack.boot.model_registry, &owner);
    let receipt = reg
        .registerModel("m1".into(), *token.address(), "accuracy".into())
        .mine()
        .await;
    let logged = receipt
        .inner
        .logs()
        .iter()
        .find_map(|l| ModelRegistry::ModelRegistered::decode_log(&l.inner).ok())
        .expect("ModelRegistered is emitted");
    assert_eq!(logged.modelId, "m1");
    assert_eq!(logged.token, *token.address());
    assert!(reg.isRegistered("m1".into()).call().await.unwrap());
    assert_eq!(
        reg.modelOfToken(*token.address()).call().await.unwrap(),
        "m1"
    );

    // Duplicates revert: the same model, the same token under another id, and an EOA.
    let token2 = HokusaiToken::deploy(&owner, "Hokusai m2".into(), "M2".into(), manager_addr)
        .await
        .unwrap();
    let errs = [
        reg.registerModel("m1".into(), *token2.address(), "accuracy".into())
            .call()
            .await
            .unwrap_err(),
        reg.registerModel("m2".into(), *token.address(), "accuracy".into())
            .call()
            .await
            .unwrap_err(),
        reg.registerModel("m3".into(), other_addr, "accuracy".into())
            .call()
            .await
            .unwrap_err(),
        reg.registerModel("".into(), *token2.address(), "accuracy".into())
            .call()
            .await
            .unwrap_err(),
    ];
    use ModelRegistry::ModelRegistryErrors as E;
    let decoded: Vec<_> = errs
        .iter()
        .map(|e| e.as_decoded_interface_error::<E>())
        .collect();
    assert!(
        matches!(decoded[0], Some(E::ModelAlreadyRegistered(_))),
        "{:?}",
        errs[0]
    );
    assert!(
        matches!(decoded[1], Some(E::TokenAlreadyRegistered(_))),
        "{:?}",
        errs[1]
    );
    assert!(
        matches!(decoded[2], Some(E::TokenHasNoCode(_))),
        "{:?}",
        errs[2]
    );
    assert!(
        matches!(decoded[3], Some(E::EmptyModelId(_))),
        "{:?}",
        errs[3]
    );
    reg.setRegistrar(other_addr, true).mine().await;
    reg_other
        .registerModel("m2".into(), *token2.address(), "f1".into())
        .mine()
        .await;

    // The manager (the controller) mints and burns for its owner only, and only registered models.
    let mgr = TokenManager::new(manager_addr, &owner);
    mgr.mintTokens("m1".into(), other_addr, U256::from(1000))
        .mine()
        .await;
    assert_eq!(
        token.balanceOf(other_addr).call().await.unwrap(),
        U256::from(1000)
    );
    mgr.burnTokens("m1".into(), other_addr, U256::from(400))
        .mine()
        .await;
    assert_eq!(
        token.balanceOf(other_addr).call().await.unwrap(),
        U256::from(600)
    );
    let mgr_other = TokenManager::new(manager_addr, &other);
    assert!(mgr_other
        .mintTokens("m1".into(), other_addr, U256::from(1))
        .call()
        .await
        .is_err());
    let err = mgr
        .mintTokens("nope".into(), other_addr, U256::from(1))
        .call()
        .await
        .unwrap_err();
    assert!(matches!(
        err.as_decoded_interface_error::<TokenManager::TokenManagerErrors>(),
        Some(TokenManager::TokenManagerErrors::ModelNotRegistered(_))
    ));

    // The owner hands control over (ControllerSet); a stranger cannot.
    let t_other = HokusaiToken::new(*token.address(), &other);
    assert!(t_other.setController(other_addr).call().await.is_err());
    let r = token.setController(other_addr).mine().await;
    assert!(r
        .inner
        .logs()
        .iter()
        .any(|l| HokusaiToken::ControllerSet::decode_log(&l.inner).is_ok()));
    t_other.mint(other_addr, U256::from(5)).mine().await;
    assert_eq!(
        token.balanceOf(other_addr).call().await.unwrap(),
        U256::from(605)
    );
}

/// anvil's fifth development key: funded, and neither a deployer nor a registrar.
const STRANGER_KEY: &str = "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_deploys_and_registers_a_clone_at_the_predicted_address_in_one_transaction() {
    let stack = Stack::start().await;
    let (owner, owner_addr) = wallet_provider(&stack, ANVIL_DEV_KEY);
    let (stranger, stranger_addr) = wallet_provider(&stack, STRANGER_KEY);
    let manager_addr = stack.boot.token_manager;
    let mgr = TokenManager::new(manager_addr, &owner);

    // The chain's prediction and ours agree, before anything is sent.
    let factory = TokenFactory::read(&owner, manager_addr).await.unwrap();
    assert_eq!(factory.implementation, stack.boot.token_implementation);
    let predicted = mgr.predictToken("clone_1".into()).call().await.unwrap();
    assert_eq!(factory.predict("clone_1"), predicted);
    assert_ne!(
        factory.predict("clone_2"),
        predicted,
        "one address per model id"
    );
    assert_eq!(
        mgr.saltOf("clone_1".into()).call().await.unwrap(),
        factory.salt("clone_1")
    );

    // Only deployers deploy; only the owner names them.
    let err = TokenManager::new(manager_addr, &stranger)
        .deployToken(
            "clone_1".into(),
            "Hokusai clone_1".into(),
            "HK-C1".into(),
            "accuracy".into(),
        )
        .call()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.as_decoded_interface_error::<TokenManager::TokenManagerErrors>(),
            Some(TokenManager::TokenManagerErrors::NotDeployer(_))
        ),
        "{err}"
    );
    assert!(TokenManager::new(manager_addr, &stranger)
        .setDeployer(stranger_addr, true)
        .call()
        .await
        .is_err());

    // One transaction: the clone, its initialization and its registration.
    let receipt = mgr
        .deployToken(
            "clone_1".into(),
            "Hokusai clone_1".into(),
            "HK-C1".into(),
            "accuracy".into(),
        )
        .mine()
        .await;
    eprintln!("deployToken gas: {}", receipt.gas_used);
    assert!(receipt.gas_used <= 300_000, "{} gas", receipt.gas_used);
    let logs = receipt.inner.logs();
    let deployed = logs
        .iter()
        .find_map(|l| TokenManager::TokenDeployed::decode_log(&l.inner).ok())
        .expect("TokenDeployed is emitted");
    assert_eq!(
        (
            deployed.modelId.as_str(),
            deployed.token,
            deployed.performanceMetric.as_str()
        ),
        ("clone_1", predicted, "accuracy")
    );
    assert!(logs
        .iter()
        .any(|l| l.address() == predicted
            && HokusaiToken::ControllerSet::decode_log(&l.inner).is_ok()));
    let reg = ModelRegistry::new(stack.boot.model_registry, &owner);
    let m = reg.getModel("clone_1".into()).call().await.unwrap();
    assert!(m.registered);
    assert_eq!(
        (m.token, m.performanceMetric.as_str()),
        (predicted, "accuracy")
    );
    assert_eq!(reg.modelOfToken(predicted).call().await.unwrap(), "clone_1");

    // A second token for the model: refused by the chain, naming the model and its token.
    let err = mgr
        .deployToken(
            "clone_1".into(),
            "Again".into(),
            "HK-AGAIN".into(),
            "f1".into(),
        )
        .call()
        .await
        .unwrap_err();
    match err.as_decoded_interface_error::<TokenManager::TokenManagerErrors>() {
        Some(TokenManager::TokenManagerErrors::TokenExists(e)) => {
            assert_eq!((e.modelId.as_str(), e.token), ("clone_1", predicted))
        }
        other => panic!("{other:?}: {err}"),
    }

    // The clone behaves as the seed's token: name, symbol, decimals, controller, owner.
    let token = HokusaiToken::new(predicted, &owner);
    assert_eq!(token.name().call().await.unwrap(), "Hokusai clone_1");
    assert_eq!(token.symbol().call().await.unwrap(), "HK-C1");
    assert_eq!(token.decimals().call().await.unwrap(), 18);
    assert_eq!(token.controller().call().await.unwrap(), manager_addr);
    assert_eq!(token.owner().call().await.unwrap(), manager_addr);
    // Mint and burn by the controller only.
    mgr.mintTokens("clone_1".into(), stranger_addr, U256::from(1000))
        .mine()
        .await;
    mgr.burnTokens("clone_1".into(), stranger_addr, U256::from(300))
        .mine()
        .await;
    assert_eq!(
        token.balanceOf(stranger_addr).call().await.unwrap(),
        U256::from(700)
    );
    for p in [&owner, &stranger] {
        let err = HokusaiToken::new(predicted, p)
            .mint(stranger_addr, U256::from(1))
            .call()
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.as_decoded_interface_error::<HokusaiToken::HokusaiTokenErrors>(),
                Some(HokusaiToken::HokusaiTokenErrors::NotController(_))
            ),
            "{err}"
        );
    }
    // Initialized once: neither the clone nor the implementation can be initialized again.
    for addr in [predicted, stack.boot.token_implementation] {
        let err = HokusaiToken::new(addr, &stranger)
            .initialize("Evil".into(), "EVIL".into(), stranger_addr)
            .call()
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.as_decoded_interface_error::<HokusaiToken::HokusaiTokenErrors>(),
                Some(HokusaiToken::HokusaiTokenErrors::AlreadyInitialized(_))
            ),
            "{addr}: {err}"
        );
    }
    // The owner's right to hand control over passes through the manager's owner.
    assert!(TokenManager::new(manager_addr, &stranger)
        .setTokenController("clone_1".into(), stranger_addr)
        .call()
        .await
        .is_err());
    mgr.setTokenController("clone_1".into(), owner_addr)
        .mine()
        .await;
    assert_eq!(token.controller().call().await.unwrap(), owner_addr);
}

/// `run` with a key that is no deployer, a manager that is not a registrar, or a
/// `chain.token_manager_address` that is no token manager: it refuses to start, and the error
/// names the missing role and what grants it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_its_roles_refuses_to_start_and_names_them() {
    let stack = Stack::start().await;
    let run = |extra: Vec<(String, String)>| {
        let env = stack.env(
            &extra
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
        );
        async move {
            let out = tokio::time::timeout(
                std::time::Duration::from_secs(60),
                tokio::process::Command::new(env!("CARGO_BIN_EXE_hokusai-deployer"))
                    .arg("run")
                    .env_clear()
                    .envs(env)
                    .env("HOKUSAI__OPS__PORT", "0")
                    .env("HOKUSAI__LOG__FORMAT", "json")
                    .output(),
            )
            .await
            .expect("run exits by itself")
            .unwrap();
            assert!(!out.status.success());
            String::from_utf8_lossy(&out.stderr).into_owned()
        }
    };
    let e = run(vec![(
        "HOKUSAI__CHAIN__PRIVATE_KEY".into(),
        STRANGER_KEY.into(),
    )])
    .await;
    assert!(
        e.contains("is not a deployer") && e.contains("setDeployer("),
        "{e}"
    );
    let e = run(vec![(
        "HOKUSAI__CHAIN__TOKEN_MANAGER_ADDRESS".into(),
        stack.boot.model_registry.to_string(),
    )])
    .await;
    assert!(e.contains("is not a TokenManager"), "{e}");
    // An address with no code at all.
    let e = run(vec![(
        "HOKUSAI__CHAIN__TOKEN_MANAGER_ADDRESS".into(),
        "0x000000000000000000000000000000000000dEaD".into(),
    )])
    .await;
    assert!(
        e.contains("chain.token_manager_address") && e.contains("is not a TokenManager"),
        "{e}"
    );
    // A manager wired to an address that is no registry: the interface probe names it.
    let (owner, _) = wallet_provider(&stack, ANVIL_DEV_KEY);
    let bogus = Address::repeat_byte(0x42);
    let stray = TokenManager::deploy(
        &owner,
        bogus,
        stack.boot.token_implementation,
        alloy::primitives::B256::ZERO,
    )
    .await
    .unwrap();
    let e = run(vec![
        (
            "HOKUSAI__CHAIN__TOKEN_MANAGER_ADDRESS".into(),
            stray.address().to_string(),
        ),
        (
            "HOKUSAI__CHAIN__MODEL_REGISTRY_ADDRESS".into(),
            bogus.to_string(),
        ),
    ])
    .await;
    assert!(
        e.contains("chain.model_registry_address") && e.contains("is not a ModelRegistry"),
        "{e}"
    );
    // A registry address that is not the manager's: named, with the address to set.
    let e = run(vec![(
        "HOKUSAI__CHAIN__MODEL_REGISTRY_ADDRESS".into(),
        stack.boot.token_implementation.to_string(),
    )])
    .await;
    assert!(
        e.contains("chain.model_registry_address")
            && e.contains(&stack.boot.model_registry.to_string()),
        "{e}"
    );
    let (owner, _) = wallet_provider(&stack, ANVIL_DEV_KEY);
    ModelRegistry::new(stack.boot.model_registry, &owner)
        .setRegistrar(stack.boot.token_manager, false)
        .mine()
        .await;
    let e = run(vec![]).await;
    assert!(
        e.contains("is not a registrar") && e.contains("setRegistrar("),
        "{e}"
    );
}
