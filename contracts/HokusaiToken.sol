// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title HokusaiToken
/// @notice The ERC-20 token of one Hokusai model. Only its controller (the TokenManager)
///         mints and burns; the owner (the deployer) may hand control to another manager.
contract HokusaiToken is ERC20, Ownable {
    /// @notice The only address allowed to mint and burn.
    address public controller;

    event ControllerSet(address indexed controller);

    error NotController(address caller);
    error ZeroController();

    /// @dev Seed 000 §3 signature; OpenZeppelin v5's Ownable needs an owner, which is the deployer.
    constructor(string memory _name, string memory _symbol, address _controller)
        ERC20(_name, _symbol)
        Ownable(msg.sender)
    {
        if (_controller == address(0)) revert ZeroController();
        controller = _controller;
        emit ControllerSet(_controller);
    }

    modifier onlyController() {
        if (msg.sender != controller) revert NotController(msg.sender);
        _;
    }

    function mint(address to, uint256 amount) external onlyController {
        _mint(to, amount);
    }

    function burn(address from, uint256 amount) external onlyController {
        _burn(from, amount);
    }

    function setController(address _controller) external onlyOwner {
        if (_controller == address(0)) revert ZeroController();
        controller = _controller;
        emit ControllerSet(_controller);
    }
}
