"""A throwaway PostgreSQL server for the tests, started from the machine's own PostgreSQL binaries.

PostgreSQL itself is installed by `make install` (its `system-deps` step), never here. The server
listens on 127.0.0.1 on a free port and is stopped when the session ends.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def find_bin_dir() -> Path | None:
    """The folder of the newest installed PostgreSQL's initdb and pg_ctl, or None when there is none."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if candidates:
        return Path(candidates[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server(bin_dir: Path) -> Iterator[str]:
    """Yield a `postgresql+asyncpg://` URL of a fresh server's `postgres` database."""
    # Not under pytest's tmp folder: that is private to root, and the server may run as `postgres`.
    base_dir = Path(tempfile.mkdtemp(prefix="easel-pg-"))
    data = base_dir / "pgdata"
    data.mkdir(parents=True)
    # initdb refuses to run as root: run the server as the `postgres` system user then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(base_dir, "postgres")
        shutil.chown(data, "postgres")
    port = _free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "easel", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True)
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                    str(data / "log"), "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+asyncpg://easel@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(base_dir, ignore_errors=True)
