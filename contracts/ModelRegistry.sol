// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title ModelRegistry
/// @notice Maps a model id to its one token and the performance metric it was validated on.
///         It is the final guard against a second token for a model: a model id and a token
///         can each be registered once, and only a deployed contract can be registered.
contract ModelRegistry is Ownable {
    /// @dev `token` and `registeredAt` share a slot: one storage write less per model.
    struct Model {
        address token;
        uint64 registeredAt;
        string performanceMetric;
    }

    mapping(string => Model) private models;
    mapping(address => string) private tokenModels;
    mapping(address => bool) public registrars;

    event ModelRegistered(string modelId, address indexed token, string performanceMetric);
    event RegistrarSet(address indexed registrar, bool allowed);

    error NotRegistrar(address caller);
    error EmptyModelId();
    error ModelAlreadyRegistered(string modelId, address token);
    error TokenAlreadyRegistered(address token);
    error TokenHasNoCode(address token);

    /// @dev The owner starts as a registrar so a fresh chain is usable in one step.
    constructor() Ownable(msg.sender) {
        registrars[msg.sender] = true;
        emit RegistrarSet(msg.sender, true);
    }

    modifier onlyRegistrar() {
        if (!registrars[msg.sender]) revert NotRegistrar(msg.sender);
        _;
    }

    function setRegistrar(address registrar, bool allowed) external onlyOwner {
        registrars[registrar] = allowed;
        emit RegistrarSet(registrar, allowed);
    }

    function registerModel(string calldata modelId, address token, string calldata performanceMetric)
        external
        onlyRegistrar
    {
        if (bytes(modelId).length == 0) revert EmptyModelId();
        Model storage existing = models[modelId];
        if (existing.token != address(0)) revert ModelAlreadyRegistered(modelId, existing.token);
        if (bytes(tokenModels[token]).length != 0) revert TokenAlreadyRegistered(token);
        if (token.code.length == 0) revert TokenHasNoCode(token);
        models[modelId] = Model(token, uint64(block.timestamp), performanceMetric);
        tokenModels[token] = modelId;
        emit ModelRegistered(modelId, token, performanceMetric);
    }

    function isRegistered(string calldata modelId) external view returns (bool) {
        return models[modelId].token != address(0);
    }

    function getToken(string calldata modelId) external view returns (address) {
        return models[modelId].token;
    }

    function getModel(string calldata modelId)
        external
        view
        returns (address token, string memory performanceMetric, uint64 registeredAt, bool registered)
    {
        Model storage m = models[modelId];
        return (m.token, m.performanceMetric, m.registeredAt, m.token != address(0));
    }

    function modelOfToken(address token) external view returns (string memory) {
        return tokenModels[token];
    }
}
