"""The SQL the usage ledger's writer runs, on its one thread: opening the database, and writing a
batch of records as a few INSERT statements of many rows each (``gateway.usage.ledger`` decides
when, and what to do when a write fails).

A batch goes in as INSERT statements of up to ``MAX_ROWS_PER_INSERT`` rows, their sizes from a
fixed few (``row_counts``) so that each statement is compiled once and then taken from sqlite3's
statement cache; its values are bound holding the GIL (~0.1-0.2 ms for a full statement, the
longest the event loop waits for the writer), each of a type sqlite3 binds as it is
(``bindable``). ``write_each`` writes a batch the database refused row by row, to find the
records it cannot store.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Final

from gateway.usage.schema import BUSY_TIMEOUT_S, INSERT, LedgerError, UsageRecord, migrate

logger = logging.getLogger("gateway.usage.ledger")

# Rows per INSERT statement at most (fewer when the SQLite build binds fewer parameters): a power
# of two, see ``row_counts``.
MAX_ROWS_PER_INSERT: Final = 128


# A NaN bound as a double is stored as NULL (SQLite's sqlite3_bind_double), and a float needs no
# adapter: what ``bindable`` binds for None.
NULL: Final = float("nan")
_WIDTH: Final = len(UsageRecord._fields)
_CUT: Final = UsageRecord._fields.index("cut")


def bindable(rows: Sequence[UsageRecord]) -> list[object]:
    """The values of ``rows``, in order, as types sqlite3 binds without adapting them: None as
    ``NULL`` (stored as NULL), the ``cut`` bool as 0 or 1 (as it is stored), the rest as it is.

    sqlite3 looks up an adapter for every value bound that is not exactly an int, float, str or
    bytes: a key tuple built, a dict lookup and a call, even with an adapter registered. A row has
    several NULLs and a bool: ~9,900 instructions a row, a third of the writer's
    (``bench/server_instructions.py --threads``), where this pass costs ~3,200 more than passing
    the values as they are (callgrind, 128-row statements)."""
    values: list[object] = [NULL if value is None else value for value in chain.from_iterable(rows)]
    values[_CUT::_WIDTH] = [int(row.cut) for row in rows]
    return values


def _register_adapters() -> None:
    """For the values ``bindable`` does not make plain (``write_each``'s rows, bound as they are):
    sqlite3 "adapts" every value bound that is not exactly an int, float, str or bytes: without an
    adapter registered for its type, that takes two failed attribute lookups, one raising (and
    formatting) an AttributeError. These adapters change no value (None is bound as NULL and a
    bool as 0 or 1, as without them); they are only found at once. sqlite3 keeps adapters for the
    whole process, so this is done when a ledger opens its writer, never at import, and doing it
    again is a no-op.
    """
    sqlite3.register_adapter(type(None), _same)
    sqlite3.register_adapter(bool, int)


def _same(value: None) -> None:
    return value


def open_writer(path: Path) -> sqlite3.Connection:
    """The writer's connection (autocommit, WAL, ``synchronous=NORMAL``), the file created or
    migrated first (``gateway.usage.schema``)."""
    _register_adapters()
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("ledger: %s could not be put in WAL mode (journal_mode=%s)", path, mode)
        conn.execute("PRAGMA synchronous=NORMAL")
        migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def prepare(path: Path) -> None:
    """Create or migrate the ledger at ``path`` now, before serving: a file that cannot be used (a
    newer gateway's, a directory that cannot be made, a disk that refuses it) raises a
    ``LedgerError`` that names it, for a one-line error at start-up instead of a failed lifespan."""
    try:
        open_writer(path).close()  # (a newer gateway's file: migrate's LedgerError names it already)
    except (sqlite3.Error, OSError) as exc:
        raise LedgerError(f"{path} cannot be opened as the usage ledger: {exc}") from exc


def row_counts(count: int, largest: int) -> list[int]:
    """``count`` rows as the sizes of the INSERT statements that write them: ``largest`` (a power of
    two) as often as it fits, then the powers of two that make up the rest (its binary digits).

    So the ledger only ever runs a few different statements (8 at most), each compiled once and then
    taken from sqlite3's statement cache. A statement of each batch's own size is a new statement for
    nearly every batch (at moderate traffic each flush holds a different number of rows; sqlite3
    caches 128 statements, the sizes were up to 200), compiled again every time: ~9,700 instructions
    a row, against ~12,700 for storing it (callgrind, ``bench/server_instructions.py``)."""
    counts = [largest] * (count // largest)
    rest = count % largest
    while rest:
        counts.append(1 << (rest.bit_length() - 1))
        rest -= counts[-1]
    return counts


@functools.lru_cache(maxsize=16)
def _insert_rows(count: int) -> str:
    """INSERT for ``count`` rows (SQL of constants only: the record's field names, which are the
    columns; values are bound)."""
    row = f"({', '.join('?' * len(UsageRecord._fields))})"
    return f"INSERT INTO usage ({', '.join(UsageRecord._fields)}) VALUES {', '.join([row] * count)}"  # noqa: S608


def write_batch(conn: sqlite3.Connection | None, batch: Sequence[UsageRecord]) -> None:
    """Write ``batch`` in one transaction, as the INSERT statements of ``row_counts``."""
    assert conn is not None
    bound = min(MAX_ROWS_PER_INSERT, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // len(UsageRecord._fields))
    largest = 1 << (bound.bit_length() - 1)  # a power of two
    conn.execute("BEGIN")
    try:
        # Each record is its row; see the module docstring.
        start = 0
        for count in row_counts(len(batch), largest):
            rows = batch[start : start + count]
            start += count
            conn.execute(_insert_rows(count), bindable(rows))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def write_each(conn: sqlite3.Connection | None, batch: Sequence[UsageRecord]) -> list[UsageRecord]:
    """Write each record on its own (in one transaction); returns those the database refused."""
    assert conn is not None
    rejected: list[UsageRecord] = []
    conn.execute("BEGIN")
    try:
        for record in batch:
            try:
                conn.execute(INSERT, record)
            except (sqlite3.InterfaceError, sqlite3.IntegrityError, sqlite3.DataError, OverflowError, TypeError):
                rejected.append(record)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return rejected
