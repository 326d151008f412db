"""Three small asyncio idioms, each written once: a broadcast wake-up, "the first of
several", and a jittered exponential back-off."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import Any

# 2**64 times any setting is still a finite float; the exponent never needs to be larger.
_MAX_EXPONENT = 64


class Pulse:
    """A broadcast wake-up with a version number.

    Every `notify()` bumps `version` and wakes every waiter. A waiter that reads `version`,
    does some work, then calls `wait(since=that_version)` never misses a notify that came in
    between: that is what the version is for. Single event loop, no locks.
    """

    def __init__(self) -> None:
        self.version = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, since: int | None = None) -> None:
        """Until the version moves past `since` (default: the version when called)."""
        since = self.version if since is None else since
        while self.version == since:
            await self._event.wait()


async def first_of(*aws: Awaitable[Any]) -> int:
    """Wait until the first of `aws` is done and return its index (the lowest, on a tie).

    Coroutines are wrapped in tasks that are cancelled and awaited before this returns;
    futures and tasks passed in belong to the caller and keep running. An exception from a
    wrapped coroutine that finished first is raised here. Cancelling the caller cancels the
    wrapped coroutines too.
    """
    owned = [not asyncio.isfuture(aw) for aw in aws]
    futures = [asyncio.ensure_future(aw) for aw in aws]
    try:
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
    finally:
        mine = [f for f, is_mine in zip(futures, owned, strict=True) if is_mine]
        for future in mine:
            future.cancel()
        await asyncio.gather(*mine, return_exceptions=True)
    index = next(i for i, future in enumerate(futures) if future in done)
    first = futures[index]
    if owned[index] and not first.cancelled() and (exc := first.exception()) is not None:
        raise exc
    return index


class Backoff:
    """Full-jitter exponential back-off: after n failures the delay is uniform in
    [0, min(max_s, initial_s * 2**n)].

    The bounds are passed to each `next_delay()` so that a live reload of the settings takes
    effect at the next delay. The failure count stops growing at 64, so no arithmetic on it
    can overflow however long a peer stays down.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self.failures = 0

    def next_delay(self, initial_s: float, max_s: float) -> float:
        ceiling = min(max_s, initial_s * 2.0 ** min(self.failures, _MAX_EXPONENT))
        self.failures = min(self.failures + 1, _MAX_EXPONENT)
        return self._rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.failures = 0
