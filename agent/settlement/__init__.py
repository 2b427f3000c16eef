"""Settlement on a rich-client node (DESIGN s6).

channel.vy / token.vy / artifact.json   the contract, a test ERC-20, the compiled artifact
artifacts.py    load the artifact; rebuild it from source (python -m agent.settlement.artifacts)
adjudicator.py  the contract's rules in plain Python (reference)
model.py        ChannelRecord, SignedState, Status, TxResult
txsign.py       EIP-1559 transactions signed through a digest signer (SettlementKey)
rpc.py          JSON-RPC: retries, nonces, gas, fees, confirmations
client.py       SettlementClient: open, deposit, cooperative_close, close, challenge, settle
chain.py        InProcessChain (eth-tester + py-evm), deploy_contracts, advance_time
watchtower.py   challenge stale closes with the best valid state handed off
handoff.py      a co-signed state handed to a tower, signed by a channel party
towerstore.py   the tower's crash-safe store
settings.py     the [settlement] config table
commands.py     edge-agent channel status | close | settle | watch
"""
