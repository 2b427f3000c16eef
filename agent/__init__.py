"""ev-edge-agent core: readings, envelopes, keys, spool, uplink, channel, settlement.

Nothing in this package touches hardware; adapters live in ``firmware_adapters``.
"""

__version__ = "0.1.0"
