"""The one backoff policy every retry loop uses (Redis, cameras, alert sinks)."""

from stream.backoff import Backoff


def test_doubles_up_to_the_maximum_and_resets():
    b = Backoff(0.2, 1.0)
    assert [b.next_delay() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.delay == 1.0  # what the next failure will wait (logged as "next in")
    b.reset()
    assert b.next_delay() == 0.2 and b.delay == 0.4


def test_zero_initial_delay_stays_zero():
    b = Backoff(0.0, 5.0)
    assert [b.next_delay() for _ in range(3)] == [0.0, 0.0, 0.0]
