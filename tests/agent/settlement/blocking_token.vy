# pragma version 0.4.3
"""A hostile ERC-20 for tests: transfers to a blocked address revert (mode 1) or return
false (mode 2), the way a token with a blacklist or a pause does, or burn every unit of gas
they are given (mode 3: INVALID, the griefing token of issue 14)."""

balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
mode: public(HashMap[address, uint256])


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount


@external
def set_mode(account: address, m: uint256):
    self.mode[account] = m


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    return True


@external
def transfer(receiver: address, amount: uint256) -> bool:
    assert self.mode[receiver] != 1, "blocked"
    assert self.mode[receiver] != 3, UNREACHABLE   # INVALID: consumes all gas it was given
    if self.mode[receiver] == 2:
        return False
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[receiver] += amount
    return True


@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    self.allowance[sender][msg.sender] -= amount
    self.balanceOf[sender] -= amount
    self.balanceOf[receiver] += amount
    return True
