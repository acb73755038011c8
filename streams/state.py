"""Per-user state in a RocksDB-backed Faust table, seen through a write-back cache.

:class:`TableUsers` is the mutable mapping an :class:`calibration.engine.Engine`
works on for one partition. Reads go to the table once and are cached; writes
stay in the cache and are marked dirty until :meth:`flush`, which writes each
changed user once (one changelog record per user per batch, however many of
their events the batch held) and tombstones forgotten users. ``flush`` must
run inside an event of the partition, because Faust picks the RocksDB
partition and the changelog partition from the current event.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import orjson

from calibration.user_state import UserState

__all__ = ["TableUsers", "TableErased", "encode_user", "decode_user", "partition_items", "ERASED_PREFIX"]

#: Keys of forget markers in the users table (a NUL byte cannot start a user id we accept).
ERASED_PREFIX = b"\x00erased:"


def encode_user(state: UserState) -> bytes:
    return orjson.dumps(state.to_dict())


def decode_user(raw: bytes) -> UserState:
    return UserState.from_dict(orjson.loads(raw))


def partition_db(table, partition: int):
    """The RocksDB database of one partition of a RocksDB-backed table.

    Reads go straight to it: through the table, a read outside an event's
    context probes every partition's database in turn.
    """
    return table.data._db_for_partition(partition)


def partition_items(table, partition: int) -> Iterator[tuple[bytes, bytes]]:
    """Raw (key, value) pairs of one partition of a RocksDB-backed table.

    Faust has no public per-partition iterator; this uses the RocksDB store's
    own per-partition database and visibility filter (which hides Faust's
    offset key). Read-only, so it needs no event context.
    """
    store = table.data
    db = store._db_for_partition(partition)
    yield from store._visible_items(db)


class TableUsers:
    """Write-back, size-bounded cache of one partition's users over a Faust table."""

    def __init__(self, table, partition: int, cache_max: int = 100_000):
        self.table = table
        self.partition = partition
        self._db = partition_db(table, partition)
        self.cache_max = cache_max
        self._cache: OrderedDict[str, UserState] = OrderedDict()
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()

    # -- mapping interface used by the engine ---------------------------
    def get(self, user_id: str, default=None):
        state = self._cache.get(user_id)
        if state is not None:
            self._cache.move_to_end(user_id)
            return state
        if user_id in self._deleted:
            return default
        raw = self._db.get(user_id.encode())
        if raw is None:
            return default
        state = decode_user(raw)
        self._cache[user_id] = state
        return state

    def __getitem__(self, user_id: str) -> UserState:
        state = self.get(user_id)
        if state is None:
            raise KeyError(user_id)
        return state

    def __contains__(self, user_id: str) -> bool:
        return self.get(user_id) is not None

    def __setitem__(self, user_id: str, state: UserState) -> None:
        self._cache[user_id] = state
        self._cache.move_to_end(user_id)
        self._dirty.add(user_id)
        self._deleted.discard(user_id)

    def __delitem__(self, user_id: str) -> None:
        self._cache.pop(user_id, None)
        self._dirty.discard(user_id)
        self._deleted.add(user_id)

    def pop(self, user_id: str, default=None):
        state = self.get(user_id)
        self.__delitem__(user_id)
        return default if state is None else state

    def items(self) -> Iterator[tuple[str, UserState]]:
        """Every user of the partition (the table as flushed, overlaid with the cache)."""
        seen = set()
        for uid, state in list(self._cache.items()):
            seen.add(uid)
            yield uid, state
        for raw_key, raw in partition_items(self.table, self.partition):
            if raw_key.startswith(ERASED_PREFIX):
                continue
            uid = raw_key.decode()
            if uid not in seen and uid not in self._deleted:
                yield uid, decode_user(raw)

    # -- persistence -------------------------------------------------------
    def flush(self) -> tuple[set[str], set[str]]:
        """Write dirty users and tombstone deleted ones; returns (written, deleted)."""
        written, deleted = self._dirty, self._deleted
        for uid in written:
            self.table[uid.encode()] = encode_user(self._cache[uid])
        for uid in deleted:
            key = uid.encode()
            if key in self.table:
                del self.table[key]  # deletes locally and writes the changelog tombstone
            else:
                # Tombstone anyway: the changelog may hold the user from before a rebalance.
                self.table.send_changelog(self.partition, key, None, value_serializer="raw")
        self._dirty, self._deleted = set(), set()
        while len(self._cache) > self.cache_max:
            self._cache.popitem(last=False)
        return written, deleted


class TableErased:
    """Forget markers (hash of the user id -> forget ts) of one partition, in the users table.

    Every marker of the partition is loaded once (they sort first: their keys
    start with NUL), so the check made for every event is a dict lookup, never
    a database read. Markers are few: one per forgotten user. New ones are
    written at :meth:`flush`, inside the partition's event context.
    """

    def __init__(self, table, partition: int | None = None):
        self.table = table
        self._cache: dict[str, float] = {}
        self._dirty: set[str] = set()
        if partition is not None:
            for key, raw in partition_db(table, partition).items():
                if not key.startswith(ERASED_PREFIX):
                    break
                self._cache[key[len(ERASED_PREFIX):].decode()] = float(raw)

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, key: str, default=None):
        return self._cache.get(key, default)

    def __setitem__(self, key: str, ts: float) -> None:
        self._cache[key] = ts
        self._dirty.add(key)

    def flush(self) -> None:
        for key in self._dirty:
            self.table[ERASED_PREFIX + key.encode()] = repr(self._cache[key]).encode()
        self._dirty = set()
