"""aiosqlite with one trip to the connection's thread per statement, instead of four.

aiosqlite runs each sqlite3 call on the connection's own thread and wakes the event loop with its
result. SQLAlchemy's aiosqlite dialect makes four such trips for every statement (make a cursor,
execute, fetch the rows, close the cursor), about 80 us of wall time and 40 us of the loop's CPU each:
over a hundred trips for one image job, a tenth of what the bot costs beyond the diffusers call
(bench/machinery.py). Here a statement's cursor is made, executed, read and closed in a single trip; its
rows, description, rowcount and lastrowid come back together. SQLAlchemy is handed this driver in place
of the aiosqlite module (bot/database.py) and uses it as it would aiosqlite: transactions, errors and
results are sqlite3's own, unchanged.

Trips are saved, too, where sqlite3 itself would do nothing on the thread. A BEGIN is held back and
run in the trip of the statement after it: BEGIN DEFERRED takes no lock before its first statement
anyway, and BEGIN IMMEDIATE takes the write lock right before that statement runs, so no other writer
can come in between. And a commit or rollback with no transaction open (a pool's rollback as it takes
back a connection whose work was committed; a single read run without BEGIN) makes no trip: sqlite3's
own commit and rollback return at once then. Each trip reports whether a transaction is open after it.

And once a connection holds SQLite's write lock (its BEGIN IMMEDIATE or EXCLUSIVE ran with the first
statement), the statements after it make no trip at all: they run on the calling thread at once, since
none of them can wait for another connection (a write transaction in WAL mode waits for nobody;
the commit, which may run a checkpoint, still goes to the thread). A trip is some 100 us of handing over
and waking up, and a job's submission, claim and finish ran three to five statements each under the
lock: 11 trips a one-image job instead of 22. Reads stay on the thread: a reader may meet a lock for a
moment (a closing connection's checkpoint), and the event loop must never sleep in SQLite's busy
handler, nor wait out a long listing.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Sequence
from functools import partial
from typing import Any

import aiosqlite


class OneTripCursor:
    """The cursor SQLAlchemy's aiosqlite dialect drives, every statement run and read in one trip.

    Rows are read whole as the statement runs, as SQLAlchemy's dialect already does for all but
    server-side cursors (which Easel does not use); fetchone/fetchmany then hand them out."""

    arraysize = 1

    def __init__(self, connection: OneTripConnection) -> None:
        self._connection = connection
        self._rows: deque[Any] = deque()
        self.description: tuple[tuple[Any, ...], ...] | None = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    async def execute(self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> OneTripCursor:
        if not parameters and sql.lstrip()[:5].upper() == "BEGIN":
            self._connection.begin_with_next_statement(sql)
            self._take((None, [], -1, None))
        else:
            self._take(await self._connection.run_statement(sqlite3.Cursor.execute, sql, parameters))
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> OneTripCursor:
        self._take(await self._connection.run_statement(sqlite3.Cursor.executemany, sql, list(parameters)))
        return self

    def _take(self, result: Outcome) -> None:
        description, rows, self.rowcount, self.lastrowid = result
        self.description, self._rows = description, deque(rows)

    async def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        count = min(self.arraysize if size is None else size, len(self._rows))
        return [self._rows.popleft() for _ in range(count)]

    async def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    async def close(self) -> None:
        self._rows.clear()  # the sqlite3 cursor was closed on the thread, in the statement's own trip

    async def __aiter__(self) -> AsyncIterator[Any]:
        while self._rows:
            yield self._rows.popleft()

    def __await__(self) -> Generator[None, None, OneTripCursor]:
        # `await connection.cursor()` and `async with connection.cursor()` both work, as with aiosqlite's
        # own (SQLAlchemy versions use either), and neither makes a trip: there is nothing to wait for.
        return self
        yield

    async def __aenter__(self) -> OneTripCursor:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


Outcome = tuple[Any, list[Any], int, int | None]  # a statement's description, rows, rowcount, lastrowid
WRITE_LOCK_BEGINS = ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE")  # the BEGINs that take the write lock at once


def _run(connection: sqlite3.Connection, begin: str | None, run: Callable[[sqlite3.Cursor, str, Any], object],
         sql: str, parameters: Any) -> tuple[Outcome, bool]:
    """On the connection's thread: the held-back `begin`, if any, then `run` (Cursor.execute or
    Cursor.executemany) on a new cursor, closed after; the statement's rows (a SELECT's, or an INSERT ...
    RETURNING's), description, rowcount and lastrowid, and whether a transaction is open after it."""
    if begin is not None:
        connection.execute(begin).close()
    cursor = connection.cursor()
    try:
        run(cursor, sql, parameters)
        rows = cursor.fetchall() if cursor.description else []
        return (cursor.description, rows, cursor.rowcount, cursor.lastrowid), connection.in_transaction
    finally:
        cursor.close()


class OneTripConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors cost no trip of their own (see OneTripCursor), whose BEGIN
    goes with the statement after it, and whose commit or rollback with nothing open costs no trip."""

    _begin: str | None = None  # a BEGIN held back for the next statement's trip
    # Whether sqlite3 may have a transaction open, as the last trip left it. When a trip fails, its outcome
    # is unknown: True, so the commit or rollback that follows is sent and sqlite3 does what it must.
    _in_transaction = False
    # Whether this connection holds the write lock, so that its statements run without a trip. When one
    # fails, SQLite may have rolled back (a full disk, say): False, and the rest go to the thread.
    _writing = False

    def cursor(self) -> OneTripCursor:  # type: ignore[override]
        return OneTripCursor(self)

    def begin_with_next_statement(self, begin: str) -> None:
        self._begin = begin

    async def run_statement(self, run: Callable[[sqlite3.Cursor, str, Any], object], sql: str,
                            parameters: Any) -> Outcome:
        """One statement (and the BEGIN held back for it) in one trip to the connection's thread, or none
        while this connection holds the write lock."""
        begin, self._begin = self._begin, None
        self._in_transaction = True
        if self._writing and begin is None:
            self._writing = False  # until this statement is known to have succeeded
            outcome, self._in_transaction = _run(self._conn, None, run, sql, parameters)
            self._writing = self._in_transaction
            return outcome
        outcome, self._in_transaction = await self._execute(lambda: _run(self._conn, begin, run, sql, parameters))
        self._writing = self._in_transaction and begin is not None and begin.upper().startswith(WRITE_LOCK_BEGINS)
        return outcome

    async def commit(self) -> None:
        await self._end(sqlite3.Connection.commit)

    async def rollback(self) -> None:
        await self._end(sqlite3.Connection.rollback)

    async def _end(self, end: Callable[[sqlite3.Connection], None]) -> None:
        self._begin = None  # a BEGIN that no statement followed began nothing
        self._writing = False
        if self._in_transaction:
            await self._execute(end, self._conn)
            self._in_transaction = False


class OneTripDriver:
    """The aiosqlite module as SQLAlchemy's dialect sees it, making OneTripConnections."""

    Connection = OneTripConnection

    def __getattr__(self, name: str) -> Any:  # errors, sqlite_version and the rest: aiosqlite's own
        return getattr(aiosqlite, name)

    @staticmethod
    def connect(database: str, *, iter_chunk_size: int = 64, **kwargs: Any) -> OneTripConnection:
        # Made on aiosqlite's thread, used there and, under the write lock, by the event loop's thread: one
        # at a time, since each statement is awaited before the next is sent.
        return OneTripConnection(partial(sqlite3.connect, database, **{**kwargs, "check_same_thread": False}),
                                 iter_chunk_size)
