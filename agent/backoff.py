"""Capped exponential back-off with jitter: the one back-off of the agent (uplink reconnects,
source restarts, Modbus and OBD retries).

"Equal jitter": half of each wait is fixed and half random, so a fleet that lost its broker
at one instant does not come back at one instant, and no wait is ever near zero. Sans-I/O:
``next()`` returns seconds and the caller sleeps.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial_s: float, cap_s: float, rng: random.Random | None = None,
                 *, jitter: bool = True) -> None:
        if not 0 < initial_s <= cap_s:
            raise ValueError("0 < initial_s <= cap_s")
        self.initial_s, self.cap_s, self.jitter = initial_s, cap_s, jitter
        self._rng = rng or random.Random()
        self.attempt = 0

    def peek(self) -> float:
        """The ceiling of the next wait (no jitter), without counting an attempt."""
        return min(self.cap_s, self.initial_s * float(2 ** min(self.attempt, 32)))

    def next(self) -> float:
        ceiling = self.peek()
        self.attempt += 1
        if not self.jitter:
            return ceiling
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempt = 0
