"""Several processes migrating a new database at once (issue 12): one migrates, the others wait, none crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import text

from bot.database import alembic_config, create_engine

ROOT = Path(__file__).resolve().parent.parent
PROCESSES = 4

# Each process imports everything first, says it is ready, and upgrades only when the test says go,
# so the upgrades start together rather than one import time apart.
UPGRADE = """
import sys
from alembic import command
import aiosqlite, asyncpg, bot.models
from bot.database import upgrade_database
print("ready", flush=True)
sys.stdin.readline()
upgrade_database(sys.argv[1])
"""


async def test_processes_upgrading_a_new_database_at_once_all_succeed(new_database_url: str) -> None:
    processes = [
        subprocess.Popen([sys.executable, "-c", UPGRADE, new_database_url], cwd=ROOT, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(PROCESSES)
    ]
    for process in processes:  # the barrier: all of them are ready before any is told to go
        assert process.stdout.readline() == "ready\n", process.communicate()[1]
    for process in processes:
        process.stdin.write("go\n")
        process.stdin.flush()
    errors = [process.communicate(timeout=120)[1] for process in processes]

    assert [process.returncode for process in processes] == [0] * PROCESSES, "\n".join(errors)
    head = ScriptDirectory.from_config(alembic_config(new_database_url)).get_current_head()
    engine = create_engine(new_database_url)
    try:
        async with engine.connect() as connection:
            versions = (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalars()
            assert list(versions) == [head]
    finally:
        await engine.dispose()
