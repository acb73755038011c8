"""Per-user state in a RocksDB-backed Faust table, seen through a write-back cache.

Layout of the ``users`` table (raw bytes, one RocksDB per partition):

* ``<user_id>`` → the user's *core* (msgpack, ~100 bytes): tag rules,
  reporting counts, version, input positions, the sequence numbers below, and
  what a pending slate needs to see the user as of its ts (older tag rules,
  impressions with no slate pending; nearly always empty);
* ``<user_id> NUL <item_id>`` → one history entry (msgpack, ~60 bytes);
* ``<user_id> NUL NUL q <seq>`` → one pending slate, ``seq`` its
  :attr:`~calibration.user_state.PendingSlate.seq` (8 bytes, big-endian);
* ``<user_id> NUL NUL r <seq>`` → one recent mature slate, ~300 bytes;
* ``<user_id> NUL NUL s <seq>`` → one remembered event id and its ts;
* ``NUL erased: <sha256>`` → a forget marker (:class:`TableErased`).

Until format 5 the core held the lists: pending slates (a label window's
worth), recent slates (the ``user:<id>`` window, up to ``user_window_max``)
and remembered ids (up to ``dedup_max``), ~300 kB for a heavy user, all
rewritten with every impression and maturity. Now each change writes the
member it adds and tombstones those it drops; recent slates and remembered
ids are only appended and dropped from the front, so a number per member (the
first one kept in the core) gives each its key in list order.

Positions ride with the core rather than in a key of their own: a watch, most
of the input, then writes one record (its entry) instead of two, and the stored
position of the watch topic may lag (see
:meth:`calibration.user_state.UserState.note_position` for why that is safe).
Users written before (format 2) kept positions under ``<user_id> NUL NUL
positions``. A user of an older format is read as it was written and rewritten
whole, in this one, at its next flush.

History is by far the largest part of a user (up to ``history_max`` entries)
and a watch event changes exactly one entry, so each entry is its own key: a
flush writes the entries that changed and the core only when it changed, as
the user noted them (:attr:`calibration.user_state.UserState.touched`), so a
flush costs what changed, not the size of the users it touches.
Rewriting the whole user on every change cost ~50 µs and ~4 kB of changelog
per event; an entry costs ~60 bytes. Keys of one user are adjacent (user ids
cannot contain NUL), so loading a user is one seek.

:class:`TableUsers` is the mutable mapping an :class:`calibration.engine.Engine`
works on for one partition. Reads go to the partition's RocksDB once and are
cached; writes stay in the cache until :meth:`TableUsers.flush`, which writes
them in one RocksDB batch and returns the same records for the changelog
(sent as produce batches: :mod:`streams.batch_send`), tombstoning forgotten
users (every key of theirs). It needs no event context.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Iterator

import msgspec
import orjson
from rocksdict import WriteBatch

from calibration.safe_pool import HistoryEntry
from calibration.user_state import CORE, PENDING, RECENT, SEEN, MatureSlate, PendingSlate, UserState

__all__ = ["TableUsers", "TableErased", "UnreadableUser", "encode_core", "decode_user", "encode_entry", "encode_slate",
           "user_records", "partition_items", "partition_db", "phase", "ERASED_PREFIX", "SEP"]

log = logging.getLogger("riskgate.state")

#: Keys of forget markers in the users table (a NUL byte cannot start a user id we accept).
ERASED_PREFIX = b"\x00erased:"
#: Between a user id and an item id in the keys of history entries.
SEP = b"\x00"
#: After ``<user_id> SEP``: where format 2 kept the user's input positions (cannot be an item id).
POSITIONS_SUFFIX = b"\x00positions"
#: After ``<user_id> SEP``: the start of the keys of a recent slate, a pending slate and a remembered
#: event id (then a sequence number, 8 bytes big-endian).
SLATE_SUFFIX = b"\x00r"
PENDING_SUFFIX = b"\x00q"  # (q for the queue of slates awaiting labels: b"\x00p" starts format 2's positions key)
SEEN_SUFFIX = b"\x00s"
_SUFFIX_OF = {RECENT: SLATE_SUFFIX, PENDING: PENDING_SUFFIX, SEEN: SEEN_SUFFIX}  # touched marker -> key suffix
#: In TableUsers' unsynced keys: the user was written whole (as ``touched=None``).
WHOLE = "\x00whole"
# The core's first element. Format 1 cores were JSON objects holding the history too;
# format 2 cores had no positions (they had a key of their own); cores of formats 2
# and 3 held the recent slates, and those of formats 2 to 4 the pending slates and remembered ids.
# Format 6 adds, after the positions, what pending slates need to see the user as of their ts
# (UserState.shown_log and rule_log: empty for nearly every user).
_FORMAT = 6

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


def phase(partition: int) -> float:
    """A partition's offset in [0, 1) for periodic work, spread evenly whatever the count (golden-ratio steps)."""
    return (partition * 0.6180339887498949) % 1.0


def encode_core(state: UserState) -> bytes:
    """A user's scalars, as one msgpack array (positions last): the lists have keys of their own."""
    return _enc.encode((
        _FORMAT,
        [(t, b, ts) for t, (b, ts) in state.tag_rules.items()],
        state.shown,
        state.flagged,
        state.pending_seq,
        state.recent_seq,
        state.seen_seq,
        state.version,
        state.positions,
        state.shown_log,
        state.rule_log,
    ))


def encode_entry(e: HistoryEntry) -> bytes:
    return _enc.encode((e.first_rank_score, e.tags, e.first_watch_pct, e.watched, e.shown, e.flagged, e.last_seen,
                        e.flag_ts, e.first_shown, e.first_watch_ts))


def encode_slate(m: MatureSlate) -> bytes:
    return _enc.encode(_slate_fields(m))


def _slate_fields(m: MatureSlate) -> tuple:
    return (m.slate_id, m.ts, m.k, m.pool, m.band, m.policy_applied, m.alpha, m.scores, m.flags, m.replacement,
            m.repeat_pct)


def _slate(user_id: str, x) -> MatureSlate:
    return MatureSlate(user_id, x[0], x[1], x[2], x[3], x[4], x[5], x[6], tuple(x[7]), tuple(x[8]), tuple(x[9]),
                       tuple(x[10]))


def encode_pending(p: PendingSlate) -> bytes:
    # The items' tags, then the violations counted at the impression, go last and only when
    # known: a riskgate before them reads the fields it knows and ignores the rest, so a roll
    # back still reads these slates.
    fields = (p.slate_id, p.ts, p.k, p.pool, p.policy_applied, p.alpha, p.item_ids, p.scores, p.replacement,
              p.repeat_pct)
    if p.tags is None:
        return _enc.encode(fields)
    return _enc.encode((*fields, p.tags) if p.violations is None else (*fields, p.tags, p.violations))


def _pending(x, seq: int) -> PendingSlate:
    tags = tuple(tuple(t) for t in x[10]) if len(x) > 10 else None  # (slates stored before tags were kept)
    return PendingSlate(x[0], x[1], x[2], x[3], x[4], x[5], tuple(x[6]), tuple(x[7]), tuple(x[8]), tuple(x[9]), seq,
                        tags, x[11] if len(x) > 11 else None)


def slate_suffix(seq: int, kind: bytes = SLATE_SUFFIX) -> bytes:
    return kind + seq.to_bytes(8, "big")


def marker_suffix(marker: str) -> bytes | None:
    """The key suffix (after ``<user_id> SEP``) a :attr:`UserState.touched` marker stands for; None: the core."""
    if marker[:1] != "\x00":
        return marker.encode()  # an item id
    kind = _SUFFIX_OF.get(marker[:2])
    return None if kind is None else slate_suffix(int(marker[2:]), kind)


def keyed_markers(state: UserState) -> set[str]:
    """The :attr:`UserState.touched` markers of everything a user keeps apart from the core."""
    out = set(state.history)
    out.update(RECENT + str(state.recent_seq + i) for i in range(len(state.recent)))
    out.update(SEEN + str(state.seen_seq + i) for i in range(len(state.seen)))
    out.update(PENDING + str(p.seq) for p in state.pending)
    return out


def user_records(state: UserState) -> list[tuple[bytes, bytes]]:
    """``(suffix, value)`` of everything of a user stored apart from the core."""
    out = [(item.encode(), encode_entry(e)) for item, e in state.history.items()]
    out.extend((slate_suffix(state.recent_seq + i), encode_slate(m)) for i, m in enumerate(state.recent))
    out.extend((slate_suffix(p.seq, PENDING_SUFFIX), encode_pending(p)) for p in state.pending)
    out.extend((slate_suffix(state.seen_seq + i, SEEN_SUFFIX), _enc.encode(kv))
               for i, kv in enumerate(state.seen.items()))
    return out


def _entry(item_id: str, raw: bytes) -> HistoryEntry:
    rank, tags, pct, watched, shown, flagged, last_seen, flag_ts, *times = _dec.decode(raw)  # times: newer entries
    return HistoryEntry(item_id, rank, tuple(tags), pct, watched, shown, flagged, last_seen, flag_ts, *times)


def decode_user(user_id: str, core: bytes, keyed=()) -> UserState:
    """A user from its core and the ``(suffix, value)`` pairs stored under ``<user_id> SEP``, in key order.

    A format-1 core (JSON) holds the whole user.
    """
    return _decode_user(user_id, core, keyed)[0]


def _decode_user(user_id: str, core: bytes, keyed, history: bool = True) -> tuple[UserState, int]:
    """:func:`decode_user` (``history``: False to skip the entries), and the format the core was written in."""
    if core[:1] == b"{":
        return UserState.from_dict(orjson.loads(core)), 1
    # Fields 5-7 are the lists in older formats, their first numbers from format 5 (recent: 4) on.
    fmt, rules, shown, flagged, pending, recent, seen, version, *rest = _dec.decode(core)
    if fmt not in (2, 3, 4, 5, _FORMAT):
        raise ValueError(f"unknown user state format {fmt!r}")
    entries, slates, pendings, seens, positions = {}, [], [], [], None
    for suffix, raw in keyed:  # (in key order: each list's members by sequence number)
        if suffix[:1] != b"\x00":
            if history:
                item = suffix.decode()
                entries[item] = _entry(item, raw)
        elif suffix[:2] == SLATE_SUFFIX:
            slates.append(raw)
        elif suffix[:2] == PENDING_SUFFIX:
            pendings.append((int.from_bytes(suffix[2:], "big"), raw))
        elif suffix[:2] == SEEN_SUFFIX:
            seens.append(raw)
        elif suffix == POSITIONS_SUFFIX:
            positions = raw
    recent_seq = seen_seq = 0
    if fmt >= 4:
        recent_seq, recent = recent, [_dec.decode(raw) for raw in slates]
    if fmt >= 5:
        pending_seq, seen_seq = pending, seen
        # in ts order (by seq among equal ts), as UserState keeps them
        pending = sorted((_pending(_dec.decode(raw), seq) for seq, raw in pendings), key=lambda p: (p.ts, p.seq))
        seen = [_dec.decode(raw) for raw in seens]
    else:
        pending = [_pending(x, i) for i, x in enumerate(pending)]
        pending_seq = len(pending)
    stored = rest[0] if fmt >= 3 else ({} if positions is None else _dec.decode(positions))
    # (a user stored before format 6 has no such logs: its slates pending then, at the upgrade,
    # cannot see late impressions or tag rules superseded before it as of their ts)
    shown_log, rule_log = ([(float(ts), int(n)) for ts, n in rest[1]],
                           [(str(t), bool(b), float(ts)) for t, b, ts in rest[2]]) if fmt >= 6 else ([], [])
    return UserState(
        user_id=user_id,
        history=entries,
        tag_rules={t: (bool(b), float(ts)) for t, b, ts in rules},
        shown=shown,
        flagged=flagged,
        pending=pending,
        pending_seq=pending_seq,
        recent=[_slate(user_id, x) for x in recent],
        recent_seq=recent_seq,
        seen={k: v for k, v in seen},
        seen_seq=seen_seq,
        version=version,
        positions=stored,
        shown_log=shown_log,
        rule_log=rule_log,
    ), fmt


def partition_db(table, partition: int):
    """The RocksDB database of one partition of a RocksDB-backed table.

    Reads go straight to it: through the table, a read outside an event's
    context probes every partition's database in turn.
    """
    return table.data._db_for_partition(partition)


def partition_items(table, partition: int) -> Iterator[tuple[bytes, bytes]]:
    """Raw (key, value) pairs of one partition of a RocksDB-backed table (Faust's offset key hidden)."""
    store = table.data
    db = store._db_for_partition(partition)
    yield from store._visible_items(db)


class UnreadableUser(LookupError):
    """A user whose stored state cannot be decoded: a corrupt record, or a format from a newer riskgate.

    The user is set aside, not guessed at: reading it as new would drop its
    flags and blocked tags. Its records stay as they are for a repair or a roll
    forward, the worker goes on with every other user, and the caller decides
    what becomes of the user's events (the worker dead-letters them; the
    engine leaves its slates pending when another user's event matures them).
    """

    def __init__(self, user_id: str, reason: str):
        super().__init__(f"the stored state of user {user_id!r} cannot be read ({reason})")
        self.user_id, self.reason = user_id, reason


class TableUsers:
    """Write-back, size-bounded cache of one partition's users over a Faust table.

    The changelog is the durable copy; the local RocksDB is a cache of it for
    users evicted from memory and for restarts. So a flush sends every change to
    the changelog at once, but writes a cached user's changed keys to the local
    database only when the user is evicted or at a *local sync* (every
    ``sync_interval`` seconds, and on demand before a revoke or stop), where the
    Faust offset that lets a restart skip the changelog moves with them, in the
    same write. Keys a user changes many times between syncs are written once:
    the local writes, half of a flush's cost when done on every flush, mostly
    disappear. The database never holds a change a flush has not handed to the
    changelog, and between syncs it lags: a restart on the same directory
    replays the changelog from the last synced offset (and after a crash the
    local stores are dropped anyway, see
    :meth:`streams.app.RiskgateApp._discard_local_state_after_a_crash`).
    """

    def __init__(self, table, partition: int, cache_max: int = 100_000, sync_interval: float = 60.0):
        self.table = table
        self.partition = partition
        self.cache_max = cache_max
        self.sync_interval = sync_interval
        self._db = partition_db(table, partition)
        self._cache: OrderedDict[str, UserState] = OrderedDict()
        self._dirty: set[str] = set()
        self._deleted: dict[str, set[str]] = {}  # user -> ids flushed but not synced when forgotten
        # Flushed to the changelog, not yet to the local database: user -> keys (as in
        # UserState.touched; with WHOLE: the whole user, and the ids it held then).
        self._local: dict[str, set] = {}
        self._sent: int | None = None  # last changelog offset known to be on the broker
        self.wrote_local = False  # whether the last flush wrote the local database (before its sends)
        # Users whose stored state cannot be decoded (UnreadableUser) -> why, remembered so
        # that each of their events does not read and fail again; a forget clears them.
        self.unreadable: dict[str, str] = {}
        # Users set aside at run time -> their keys flushed but not synced locally. While any has
        # some, the local database lacks them, so the offset that lets a restart skip the
        # changelog stays where it is (until a forget deletes them).
        self._aside: dict[str, set] = {}
        # Partitions assigned together would all sync in the same flush, one long
        # flush holding the event loop for all of them: each starts at its own
        # phase of the interval.
        self._synced_at = time.monotonic() - sync_interval * phase(partition)

    # -- reading ------------------------------------------------------------
    def _scan(self, key: bytes) -> list[tuple[bytes, bytes]]:
        """Every ``(suffix, value)`` stored under ``<key> SEP`` (history entries and positions)."""
        prefix = key + SEP
        out = []
        for k, v in self._db.items(from_key=prefix):
            if not k.startswith(prefix):
                break
            out.append((k[len(prefix):], v))
        return out

    def _decode(self, user_id: str, core: bytes, with_history: bool = True) -> tuple[UserState, int]:
        """The stored user, and the format its core was written in; raises :class:`UnreadableUser`."""
        try:
            return _decode_user(user_id, core, self._scan(user_id.encode()), with_history)
        except Exception as e:  # whatever the bytes made the decoder raise: the user is set aside
            reason = f"{type(e).__name__}: {e}"[:300]
            if user_id not in self.unreadable:
                log.error("users table partition %d: user %r set aside, its stored state cannot be read (%s); "
                          "its events go to the dead-letter topic (docs/operations.md)", self.partition, user_id,
                          reason)
            self.unreadable[user_id] = reason
            raise UnreadableUser(user_id, reason) from e

    def set_aside(self, user_id: str, reason: str) -> None:
        """Set aside a user whose state broke an invariant while it was applied (a bug, or one in what wrote it).

        Like a user that cannot be decoded: its events are dead-lettered from now on
        (``unreadable_state``), the partition goes on with every other user, and the
        group does not crash on it worker after worker. What it held in memory is dropped
        unwritten (it may be half-changed); the changelog keeps it as of the last flush,
        so the events applied to it since are lost for it. Its slates stay in the windows
        until a restart, which leaves them out.
        """
        self._cache.pop(user_id, None)
        self._dirty.discard(user_id)
        # (a forget must still tombstone the keys flushed since the last sync)
        self._aside[user_id] = self._aside.get(user_id, set()) | self._local.pop(user_id, set())
        if user_id not in self.unreadable:
            log.error("users table partition %d: user %r set aside, its state broke while applied (%s); its "
                      "events go to the dead-letter topic (docs/operations.md)", self.partition, user_id, reason)
        self.unreadable[user_id] = reason

    def _load(self, user_id: str) -> UserState | None:
        key = user_id.encode()
        core = self._db.get(key)
        if core is None:
            return None
        state, fmt = self._decode(user_id, core)
        # From here the state notes what changes; a user of an older format is not
        # tracked, so its next flush rewrites it whole in this one (and tombstones
        # format 2's positions key). Format 5 differs only in its core, which a flush
        # of any change rewrites.
        state.touched = set() if fmt == _FORMAT else {CORE} if fmt == 5 else None
        return state

    @property
    def cached(self) -> int:
        """Users held in memory."""
        return len(self._cache)

    # -- mapping interface used by the engine ---------------------------
    # Recency for eviction is refreshed once per flush for the users it wrote, not on every
    # read and write: these two run for every event.
    def get(self, user_id: str, default=None):
        """The user, ``default`` if none is stored; raises :class:`UnreadableUser` for one that cannot be read."""
        state = self._cache.get(user_id)
        if state is not None:
            return state
        if user_id in self._deleted:
            return default
        if user_id in self.unreadable:
            raise UnreadableUser(user_id, self.unreadable[user_id])
        state = self._load(user_id)
        if state is None:
            return default
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
        self._dirty.add(user_id)
        # (a user forgotten and seen again before the flush stays in _deleted: the
        # flush tombstones the old keys, then writes the new user whole)

    def __delitem__(self, user_id: str) -> None:
        self._cache.pop(user_id, None)
        self._dirty.discard(user_id)
        self.unreadable.pop(user_id, None)  # (its keys are tombstoned like any user's: a forget needs no decoding)
        # Keys in the changelog but not in the local database get tombstones too: those
        # flushed since the last sync (the flush scans the database for the others).
        self._deleted.setdefault(user_id, set()).update(self._local.get(user_id, ()), self._aside.pop(user_id, ()))

    def pop(self, user_id: str, default=None):
        """Delete the user and return it (``default`` if none).

        One that cannot be read is deleted all the same (a forget needs no
        decoding); it returns what of it can be read without its history (its
        slates, which a forget takes back out of the windows), else ``default``.
        """
        try:
            state = self.get(user_id)
        except UnreadableUser:
            # Set aside at run time: its slates stay in the windows until a restart (set_aside),
            # so none is taken out (the stored core's would not be those the windows hold).
            state = None if user_id in self._aside else self._core_only(user_id)
        self.__delitem__(user_id)
        return default if state is None else state

    def _core_only(self, user_id: str) -> UserState | None:
        key = user_id.encode()
        core = self._db.get(key)
        try:
            return None if core is None else _decode_user(user_id, core, self._scan(key), history=False)[0]
        except Exception:  # the core itself is unreadable: no window held its slates (cores() skipped it)
            return None

    def _stored_ids(self) -> Iterator[tuple[str, bytes]]:
        """(user id, core) of every user the partition's database holds: one seek per user."""
        offset_key = self.table.data.offset_key
        it = self._db.iter()
        it.seek(b"\x01")  # past the forget markers
        while it.valid():
            key = it.key()
            if key == offset_key:
                it.next()
                continue
            user, sep, _ = key.partition(SEP)
            if not sep:  # a core
                try:
                    uid = user.decode()
                except UnicodeDecodeError:  # no event can name it (ids are text): reported, never read
                    uid = None
                    self.unreadable.setdefault(repr(user), "the key is not UTF-8")
                if uid is not None:
                    yield uid, it.value()
            # else entries whose core never reached the changelog (a crash cut a flush
            # short): their events were not acked and are applied again, core and all.
            it.seek(user + b"\x01")  # past this user's history entries

    def items(self) -> Iterator[tuple[str, UserState]]:
        """Every user of the partition, whole (the table as flushed, overlaid with the cache)."""
        return self._users(with_history=True)

    def cores(self) -> Iterator[tuple[str, UserState]]:
        """Every user with its core only (history not read): what rebuilding the windows needs."""
        return self._users(with_history=False)

    def _users(self, with_history: bool) -> Iterator[tuple[str, UserState]]:
        for uid, state in list(self._cache.items()):
            yield uid, state
        for uid, core in self._stored_ids():
            if uid not in self._cache and uid not in self._deleted and uid not in self.unreadable:
                try:
                    state = self._decode(uid, core, with_history)[0]
                except UnreadableUser:
                    continue  # set aside (self.unreadable): its slates are in no window
                yield uid, state

    # -- persistence -------------------------------------------------------
    def _records(self, uid: str, state: UserState, touched: set | None) -> list[tuple[bytes, bytes | None]]:
        """The ``(key, value)`` records (``None``: a tombstone) that write ``touched`` of a user (None: whole)."""
        key = uid.encode()
        prefix = key + SEP
        history = state.history
        if touched is None:  # whole, with tombstones for what the database holds of an earlier life
            records = user_records(state)
            held = {suffix for suffix, _ in records}
            group = [(prefix + suffix, None) for suffix, _ in self._scan(key) if suffix not in held]
            group.extend((prefix + suffix, value) for suffix, value in records)
            write_core = True
        else:
            group = []
            write_core = False
            pending = seen = None  # looked up by number once asked for
            for item in touched:
                if item[:1] != "\x00":
                    e = history.get(item)
                    group.append((prefix + item.encode(), None if e is None else encode_entry(e)))
                    continue
                if item == CORE:
                    write_core = True
                    continue
                kind, seq = item[:2], int(item[2:])  # a member added (if still held) or dropped
                if kind == RECENT:
                    i = seq - state.recent_seq
                    value = encode_slate(state.recent[i]) if 0 <= i < len(state.recent) else None
                elif kind == PENDING:
                    if pending is None:
                        pending = {p.seq: p for p in state.pending}
                    p = pending.get(seq)
                    value = None if p is None else encode_pending(p)
                else:  # SEEN
                    if seen is None:
                        seen = list(state.seen.items())
                    i = seq - state.seen_seq
                    value = _enc.encode(seen[i]) if 0 <= i < len(seen) else None
                group.append((prefix + slate_suffix(seq, _SUFFIX_OF[kind]), value))
        if write_core:
            group.append((key, encode_core(state)))  # last, with its entries in one batch (see send_records)
        return group

    def flush(self, sync: bool = False) -> tuple[set[str], set[str], list[list[tuple[bytes, bytes | None]]]]:
        """Take what changed of dirty users and forgotten ones as changelog records.

        What changed is what each user noted in :attr:`UserState.touched` (entries
        by item id, the core as a whole); a user that noted nothing (new here, or
        of an old format) is written whole, with tombstones for any entries the
        database still holds of an earlier life. Returns ``(written, deleted,
        groups)`` (``deleted``: forgotten and not seen again since), and per user
        the ``(key, value)`` records (``None``: a tombstone)
        that the caller must send to the changelog, in order and each group whole
        (:func:`streams.batch_send.send_records`), before it acks the input
        records they came from. The local database gets forgotten users at once,
        changed ones when evicted or synced (``sync``: now; else when
        ``sync_interval`` has passed since the last sync).
        """
        written, deleted = self._dirty, self._deleted
        batch = WriteBatch(raw_mode=True)
        groups: list[list[tuple[bytes, bytes | None]]] = []
        local = self._local
        for uid, held in deleted.items():
            key = uid.encode()
            # Tombstones even for keys not held here: the changelog may hold the
            # user from before a rebalance, or entries not yet synced locally.
            suffixes = ({suffix for suffix, _ in self._scan(key)} | {POSITIONS_SUFFIX}
                        | {s for marker in held if (s := marker_suffix(marker)) is not None})  # (not CORE, WHOLE)
            group = [(key + SEP + suffix, None) for suffix in suffixes] + [(key, None)]
            groups.append(group)
            local.pop(uid, None)
            for k, _ in group:
                batch.delete(k)
        for uid in written:
            state = self._cache[uid]
            touched = state.touched
            group = self._records(uid, state, touched)
            if group:
                groups.append(group)
            if touched is None:  # keep the keys written whole: a forget must tombstone them
                local.setdefault(uid, set()).update((WHOLE, *keyed_markers(state)))
            elif uid in local:
                local[uid] |= touched
            else:
                local[uid] = touched  # (the state gets a new set below)
            state.touched = set()
        self._dirty, self._deleted = set(), {}
        cache = self._cache
        for uid in written:
            cache.move_to_end(uid)
        while len(cache) > self.cache_max:
            uid, state = cache.popitem(last=False)
            if uid in local:  # its changes go to the local database before it leaves memory
                self._put(batch, self._local_records(uid, state, local.pop(uid)))
        if sync or time.monotonic() - self._synced_at >= self.sync_interval:
            self._sync_into(batch)
        # (Ahead of the changelog until the groups are sent: a flush given up before that leaves
        # a local database that must not be restored from. See RiskgateApp._give_up.)
        self.wrote_local = bool(batch.len())
        if self.wrote_local:
            self._db.write(batch)
        return written, set(deleted) - written, groups

    def sync(self) -> None:
        """Write every flushed change to the local database, with the changelog offset it covers.

        Call it right after :meth:`flush` (nothing changed since): users changed
        since are written as they are now, which the changelog does not hold yet.
        """
        batch = WriteBatch(raw_mode=True)
        self._sync_into(batch)
        if batch.len():
            self._db.write(batch)

    def _sync_into(self, batch: WriteBatch) -> None:
        cache = self._cache
        for uid, keys in self._local.items():
            self._put(batch, self._local_records(uid, cache[uid], keys))
        self._local = {}
        if self._sent is not None and not any(self._aside.values()):
            # Every record up to it was flushed, so its effects are in the batch or
            # the database: a restart may skip the changelog up to it.
            batch.put(self.table.data.offset_key, str(self._sent).encode())
        self._synced_at = time.monotonic()

    def _local_records(self, uid: str, state: UserState, keys: set) -> list[tuple[bytes, bytes | None]]:
        return self._records(uid, state, None if WHOLE in keys else keys)

    @staticmethod
    def _put(batch: WriteBatch, records) -> None:
        for key, value in records:
            if value is None:
                batch.delete(key)
            else:
                batch.put(key, value)

    def note_sent(self, offset: int) -> None:
        """The changelog holds every record of this partition up to ``offset`` (a producer callback)."""
        if self._sent is None or offset > self._sent:
            self._sent = offset


class TableErased:
    """Forget markers (hash of the user id -> forget ts) of one partition, in the users table.

    A marker's value is the forget's ts as text, followed, when the user had
    applied records from a log, by a space and those log positions as JSON
    (:attr:`positions`, ``Engine.erased_positions``).

    Every marker of the partition is loaded once (they sort first: their keys
    start with NUL), so the check made for every event is a dict lookup, never
    a database read. One per forgotten user, never expired (175-494 B of memory each: see
    docs/operations.md, "Disk"). New ones are
    written at :meth:`flush`, inside the partition's event context.
    """

    def __init__(self, table, partition: int | None = None):
        self.table = table
        self._cache: dict[str, float] = {}
        self.positions: dict[str, dict[str, int]] = {}
        self._dirty: set[str] = set()
        if partition is not None:
            for key, raw in partition_db(table, partition).items():
                if not key.startswith(ERASED_PREFIX):
                    break
                name = key[len(ERASED_PREFIX):].decode("utf-8", "replace")
                ts_text, _, positions = bytes(raw).partition(b" ")
                try:
                    ts = float(ts_text)
                except ValueError:
                    ts = float("nan")
                if positions:
                    try:
                        self.positions[name] = msgspec.json.decode(positions, type=dict[str, int])
                    except msgspec.DecodeError:
                        # Without them a record applied before the forget and re-read after a crash
                        # comes back (if stamped after the forget); nothing else depends on them.
                        log.error("users table partition %d: forget marker %s has unreadable log positions "
                                  "(%r); kept without them", partition, name, positions[:40])
                if ts != ts:  # unreadable (NaN would let every event through)
                    # Whose forget it was is the key; when is lost, but no later than now (a forget
                    # from the future is refused): that user's events up to now stay dropped, and the
                    # marker is written back so that a restart does not move it again.
                    ts = time.time()
                    self._dirty.add(name)
                    log.error("users table partition %d: forget marker %s unreadable (%r); read as a forget at "
                              "%.3f, now", partition, name, raw[:40], ts)
                self._cache[name] = ts

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, key: str, default=None):
        return self._cache.get(key, default)

    def __setitem__(self, key: str, ts: float) -> None:
        self._cache[key] = ts
        self._dirty.add(key)

    def flush(self) -> None:
        for key in self._dirty:
            value = repr(self._cache[key]).encode()
            if (positions := self.positions.get(key)) is not None:
                value += b" " + msgspec.json.encode(positions)
            self.table[ERASED_PREFIX + key.encode()] = value
        self._dirty = set()
