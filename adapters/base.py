"""What `easel serve` expects of a chat adapter.

An adapter translates: platform events in, `bot` service calls out, job events (see
bot/delivery.py) rendered back onto the platform. It decides nothing (the grammar, the service and
the policy do) and never touches the database (it goes through `core.service`).
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Adapter(Protocol):
    platform: str  # the name stored on users and jobs: "discord", "telegram", "http", "console"

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, then shut down cleanly (await every task it started)."""
        ...
