"""The one retry policy (training/retry.py): bounded attempts, backoff min(max, base*2**n) x U(0.5, 1),
only for what the caller calls transient, the last exception raised as it was."""

import pytest

from training.retry import RetryPolicy


def test_retries_transient_faults_with_jittered_doubling_backoff():
    sleeps, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 6:
            raise ConnectionError(f"refused #{len(calls)}")
        return "ok"

    policy = RetryPolicy(attempts=6, base_s=0.5, max_s=3.0)
    for _ in range(20):  # the jitter is random: its bounds must hold every time
        sleeps.clear(), calls.clear()
        assert policy.call(flaky, transient=lambda e: isinstance(e, ConnectionError), sleep=sleeps.append) == "ok"
        assert len(calls) == 6 and len(sleeps) == 5
        for n, s in enumerate(sleeps):
            step = min(3.0, 0.5 * 2**n)
            assert 0.5 * step <= s <= step, (n, s)


def test_gives_up_after_attempts_and_never_retries_the_rest():
    calls, sleeps = [], []

    def down():
        calls.append(1)
        raise ConnectionError("still down")

    with pytest.raises(ConnectionError, match="still down"):
        RetryPolicy(attempts=3).call(down, transient=lambda e: True, sleep=sleeps.append)
    assert len(calls) == 3 and len(sleeps) == 2
    calls.clear()
    with pytest.raises(FileNotFoundError):
        RetryPolicy(attempts=3).call(lambda: calls.append(1) or open("/nonexistent/x"),
                                     transient=lambda e: isinstance(e, ConnectionError), sleep=sleeps.append)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="attempts >= 1"):
        RetryPolicy(attempts=0)
