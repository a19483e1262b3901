"""The one retry policy for transient faults of a remote service (the object store, corpus reads),
on tenacity: `attempts` calls in all, exponential backoff with jitter in between.

Before retry n (0-based) it waits min(max_s, base_s * 2**n) times a factor drawn from [0.5, 1], so
many workers hitting one outage do not retry in lockstep. The openai backend does not use it: the
openai SDK retries its requests itself, honouring the server's Retry-After (training/targets/openai.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_s: float = 0.25
    max_s: float = 4.0

    def __post_init__(self):
        if self.attempts < 1 or self.base_s < 0 or self.max_s < 0:
            raise ValueError(f"a RetryPolicy needs attempts >= 1 and non-negative waits, got {self}")

    def call(self, fn: Callable[[], T], *, transient: Callable[[BaseException], bool], what: str = "",
             sleep: Callable[[float], None] = time.sleep) -> T:
        """fn(), called again while it raises an exception `transient` accepts and attempts remain;
        the last exception propagates as raised. `what` names the call in the warning per retry."""
        import tenacity

        # A fixed half plus a random half of the exponential step: the step times U(0.5, 1).
        half = {"multiplier": self.base_s / 2, "max": self.max_s / 2}
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(**half) + tenacity.wait_random_exponential(**half),
            retry=tenacity.retry_if_exception(transient),
            sleep=sleep,
            reraise=True,
            before_sleep=lambda state: log.warning(
                "%s failed (attempt %d of %d), retrying in %.2fs: %s: %s", what or "call", state.attempt_number,
                self.attempts, state.upcoming_sleep, type(state.outcome.exception()).__name__, state.outcome.exception()),
        )
        return retrying(fn)
