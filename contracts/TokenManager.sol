// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";
import {HokusaiToken} from "./HokusaiToken.sol";
import {ModelRegistry} from "./ModelRegistry.sol";

/// @title TokenManager
/// @notice The controller of every HokusaiToken: the owner mints and burns a registered model's token.
contract TokenManager is Ownable {
    ModelRegistry public immutable registry;

    event Minted(string modelId, address indexed token, address indexed to, uint256 amount);
    event Burned(string modelId, address indexed token, address indexed from, uint256 amount);

    error ModelNotRegistered(string modelId);

    constructor(ModelRegistry _registry) Ownable(msg.sender) {
        registry = _registry;
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

    function _tokenOf(string calldata modelId) private view returns (address token) {
        token = registry.getToken(modelId);
        if (token == address(0)) revert ModelNotRegistered(modelId);
    }
}
