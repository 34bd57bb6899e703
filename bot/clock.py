"""The one clock the core reads: the job service, moderation, API keys and the event bus share it.

`bootstrap.open_core` builds one `Clock` and hands it to each of them, so a test that stops or moves
it moves every timestamp the core writes (jobs, bans, events) together.

Example:
    core.clock.set(datetime(2026, 5, 1, 12, tzinfo=UTC))
    core.clock.advance(timedelta(minutes=61))
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def utcnow() -> datetime:
    return datetime.now(UTC)


class Clock:
    """Now, in UTC: the real time unless a test has `set` it. Call it like `utcnow`."""

    def __init__(self, at: datetime | None = None) -> None:
        self._fixed = at

    def __call__(self) -> datetime:
        return self._fixed if self._fixed is not None else utcnow()

    def set(self, at: datetime) -> None:
        """Stop the clock at `at` (an aware datetime) until it is set or advanced again."""
        if at.tzinfo is None:
            raise ValueError(f"the clock keeps UTC: give an aware datetime, not {at!r}")
        self._fixed = at

    def advance(self, delta: timedelta) -> None:
        """Stop the clock `delta` after the time it reads now."""
        self._fixed = self() + delta
