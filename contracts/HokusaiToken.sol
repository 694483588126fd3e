// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title HokusaiToken
/// @notice The ERC-20 token of one Hokusai model. Only its controller (the TokenManager)
///         mints and burns; the owner may hand control to another manager.
/// @dev Deployed two ways. On its own, with seed 000 §3's constructor: the deployer is the
///      owner. Or as an EIP-1167 clone of one implementation, created and initialized by the
///      TokenManager in one transaction (`TokenManager.deployToken`): the manager is the owner.
///      A token is initialized once: its controller is never zero afterwards, and the
///      implementation's own constructor initializes the implementation, so nobody can.
contract HokusaiToken is ERC20, Ownable {
    /// @notice The only address allowed to mint and burn.
    address public controller;

    /// @dev A clone's name and symbol: the constructor's ERC20 storage is not a clone's.
    string private _cloneName;
    string private _cloneSymbol;

    event ControllerSet(address indexed controller);

    error NotController(address caller);
    error ZeroController();
    error AlreadyInitialized();

    /// @dev Seed 000 §3 signature; OpenZeppelin v5's Ownable needs an owner, which is the deployer.
    constructor(string memory _name, string memory _symbol, address _controller)
        ERC20(_name, _symbol)
        Ownable(msg.sender)
    {
        _setController(_controller);
    }

    /// @notice A clone's one-time set-up, with the constructor's parameters; its caller (the
    ///         TokenManager that created the clone) becomes the owner.
    function initialize(string calldata _name, string calldata _symbol, address _controller) external {
        if (controller != address(0)) revert AlreadyInitialized();
        _setController(_controller);
        _cloneName = _name;
        _cloneSymbol = _symbol;
        _transferOwnership(msg.sender);
    }

    function name() public view override returns (string memory) {
        string memory n = super.name();
        return bytes(n).length != 0 ? n : _cloneName;
    }

    function symbol() public view override returns (string memory) {
        string memory s = super.symbol();
        return bytes(s).length != 0 ? s : _cloneSymbol;
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
        _setController(_controller);
    }

    function _setController(address _controller) private {
        if (_controller == address(0)) revert ZeroController();
        controller = _controller;
        emit ControllerSet(_controller);
    }
}
