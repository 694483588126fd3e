// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {Clones} from "@openzeppelin/contracts/proxy/Clones.sol";
import {HokusaiToken} from "./HokusaiToken.sol";
import {ModelRegistry} from "./ModelRegistry.sol";

/// @title TokenManager
/// @notice Deploys each model's token and registers it in one transaction, and controls every
///         token it deployed: the owner mints and burns a registered model's token.
/// @dev A model's token is an EIP-1167 clone of `tokenImplementation` at a CREATE2 address
///      derived from the model id (and `namespace`), so one model id maps to one address on a
///      chain and the address is known before anything is sent (`predictToken`). The manager
///      must be a registrar of the registry; only deployers the owner authorises may deploy.
contract TokenManager is Ownable {
    ModelRegistry public immutable registry;
    /// @notice The HokusaiToken every model's token is a clone of.
    address public immutable tokenImplementation;
    /// @notice Mixed into every salt, so two managers on one chain predict different addresses.
    bytes32 public immutable namespace;

    mapping(address => bool) public deployers;

    event DeployerSet(address indexed deployer, bool allowed);
    event TokenDeployed(string modelId, address indexed token, string performanceMetric);
    event Minted(string modelId, address indexed token, address indexed to, uint256 amount);
    event Burned(string modelId, address indexed token, address indexed from, uint256 amount);

    error NotDeployer(address caller);
    error TokenExists(string modelId, address token);
    error ModelNotRegistered(string modelId);

    constructor(ModelRegistry _registry, address _tokenImplementation, bytes32 _namespace) Ownable(msg.sender) {
        registry = _registry;
        tokenImplementation = _tokenImplementation;
        namespace = _namespace;
    }

    function setDeployer(address deployer, bool allowed) external onlyOwner {
        deployers[deployer] = allowed;
        emit DeployerSet(deployer, allowed);
    }

    /// @notice The CREATE2 salt of a model's token.
    function saltOf(string calldata modelId) public view returns (bytes32) {
        return keccak256(abi.encode(namespace, modelId));
    }

    /// @notice The address `deployToken(modelId, ...)` deploys to.
    function predictToken(string calldata modelId) external view returns (address) {
        return Clones.predictDeterministicAddress(tokenImplementation, saltOf(modelId));
    }

    /// @notice Deploys the model's token, initialized with this manager as controller, and
    ///         registers it: both or neither. A model that has a token reverts with `TokenExists`.
    function deployToken(
        string calldata modelId,
        string calldata name,
        string calldata symbol,
        string calldata performanceMetric
    ) external returns (address token) {
        if (!deployers[msg.sender]) revert NotDeployer(msg.sender);
        address existing = registry.getToken(modelId);
        if (existing != address(0)) revert TokenExists(modelId, existing);
        token = Clones.cloneDeterministic(tokenImplementation, saltOf(modelId));
        HokusaiToken(token).initialize(name, symbol, address(this));
        registry.registerModel(modelId, token, performanceMetric);
        emit TokenDeployed(modelId, token, performanceMetric);
    }

    function mintTokens(string calldata modelId, address to, uint256 amount) external onlyOwner {
        address token = _tokenOf(modelId);
        HokusaiToken(token).mint(to, amount);
        emit Minted(modelId, token, to, amount);
    }

    function burnTokens(string calldata modelId, address from, uint256 amount) external onlyOwner {
        address token = _tokenOf(modelId);
        HokusaiToken(token).burn(from, amount);
        emit Burned(modelId, token, from, amount);
    }

    /// @notice Hands control of a model's token to another manager (the manager owns the
    ///         tokens it deployed, so their owner's right passes through its owner).
    function setTokenController(string calldata modelId, address controller) external onlyOwner {
        HokusaiToken(_tokenOf(modelId)).setController(controller);
    }

    function _tokenOf(string calldata modelId) private view returns (address token) {
        token = registry.getToken(modelId);
        if (token == address(0)) revert ModelNotRegistered(modelId);
    }
}
