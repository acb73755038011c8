# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""streams.bench_columnar.ColumnarPartition compiled: the same rules and flush over C++ containers (see README.md)."""
from libcpp.unordered_map cimport unordered_map
from libcpp.string cimport string
from libcpp.vector cimport vector
from libc.math cimport NAN, isnan
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from cython.operator cimport dereference as deref
import msgspec

cdef enum:
    WATCHED = 1
    SHOWN = 2
    FLAGGED = 4

cdef struct Row:
    double rank, pct, last_seen, flag_ts, first_shown, first_watch_ts
    unsigned char bits

cdef struct User:
    unordered_map[string, int] rows
    long pos[8]
    vector[int] dirty
    bint listed
    bint core
    bint pool_changed

cdef inline string _s(str x):
    cdef Py_ssize_t n
    cdef const char* p = PyUnicode_AsUTF8AndSize(x, &n)
    return string(p, n)

cdef class CFold:
    cdef unordered_map[string, int] uidx
    cdef vector[User] users
    cdef vector[Row] rows
    cdef list item, tags, uids, pending, changed
    cdef dict src
    cdef double beta
    cdef object enc
    cdef public dict max_ts

    def __init__(self, beta=50.0):
        self.beta = beta
        self.item, self.tags, self.uids, self.pending, self.changed = [], [], [], [], []
        self.src = {}
        self.max_ts = {}
        self.enc = msgspec.msgpack.Encoder()

    cdef int _user(self, str uid):
        cdef string k = _s(uid)
        it = self.uidx.find(k)
        if it != self.uidx.end():
            return deref(it).second
        cdef int u = self.users.size()
        self.uidx[k] = u
        cdef User rec
        for i in range(8):
            rec.pos[i] = -1
        rec.listed = False; rec.core = False; rec.pool_changed = False
        self.users.push_back(rec)
        self.uids.append(uid)
        self.pending.append([])
        return u

    cdef int _row(self, int u, str item_id):
        cdef string k = _s(item_id)
        cdef User* up = &self.users[u]
        it = up.rows.find(k)
        if it != up.rows.end():
            return deref(it).second
        cdef int r = self.rows.size()
        up.rows[k] = r
        cdef Row row
        row.rank = NAN; row.pct = NAN; row.last_seen = NAN; row.flag_ts = NAN; row.first_shown = NAN
        row.first_watch_ts = NAN; row.bits = 0
        self.rows.push_back(row)
        self.item.append(item_id)
        self.tags.append(())
        return r

    cdef inline void _touch(self, int u, int r):
        cdef User* up = &self.users[u]
        if not up.listed:
            up.listed = True
            self.changed.append(u)
        up.dirty.push_back(r)

    def apply(self, ev, str source, long offset):
        cdef int s
        o = self.src.get(source)
        if o is None:
            s = len(self.src); self.src[source] = s
        else:
            s = o
        cdef int u = self._user(ev.user_id)
        if offset <= self.users[u].pos[s]:
            return "replayed"
        kind = ev.event_type
        cdef double ts = ev.ts, d, pct
        cdef int r
        cdef Row* row
        if kind == "watch":
            r = self._row(u, ev.item_id)
            row = &self.rows[r]
            if not (row.bits & WATCHED) or ts < row.first_watch_ts:
                d = ev.duration_ms
                pct = 100.0 * ev.watch_ms / d if d else NAN
                row.pct = pct; row.first_watch_ts = ts; row.bits |= WATCHED
                if (row.bits & (SHOWN | FLAGGED)) == SHOWN and pct > self.beta:
                    self.users[u].pool_changed = True
            if not ts <= row.last_seen:
                row.last_seen = ts
            self.users[u].pos[s] = offset
            self._touch(u, r)
        elif kind == "impression":
            rs = []
            for it in ev.items:
                r = self._row(u, it.item_id)
                row = &self.rows[r]
                if not (row.bits & SHOWN):
                    row.rank = it.score if it.rank_score is None else it.rank_score
                    self.tags[r] = tuple(it.tags)
                    row.bits |= SHOWN
                if not ts >= row.first_shown:
                    row.first_shown = ts
                if not ts <= row.last_seen:
                    row.last_seen = ts
                rs.append(r)
                self._touch(u, r)
            self.pending[u].append((ev.slate_id, ts, ev.k, ev.policy_applied, ev.alpha, tuple(rs),
                                    tuple(it.score for it in ev.items), tuple(it.replacement for it in ev.items)))
            self.users[u].pos[s] = offset
            self.users[u].core = True; self.users[u].pool_changed = True
        elif kind == "flag":
            r = self._row(u, ev.item_id)
            row = &self.rows[r]
            row.bits |= FLAGGED
            if not ts >= row.flag_ts:
                row.flag_ts = ts
            if not ts <= row.last_seen:
                row.last_seen = ts
            self.users[u].pos[s] = offset
            self.users[u].core = True; self.users[u].pool_changed = True
            self._touch(u, r)
        else:
            return "skipped"
        m = self.max_ts.get(source)
        if m is None or ts > m:
            self.max_ts[source] = ts
        return "ok"

    def flush(self):
        enc = self.enc
        cdef list records = []
        cdef int u, r
        cdef User* up
        cdef Row* row
        for u in self.changed:
            up = &self.users[u]
            seen = set()
            out = []
            for r in up.dirty:
                if r in seen:
                    continue
                seen.add(r)
                row = &self.rows[r]
                out.append((self.item[r], self.tags[r], row.bits, row.rank, row.pct, row.last_seen, row.flag_ts,
                            row.first_shown, row.first_watch_ts))
            up.dirty.clear(); up.listed = False
            key = (<str>self.uids[u]).encode()
            records.append((key + b"\x00d", enc.encode(out)))
            if up.core:
                records.append((key + b"\x00c", enc.encode((None, self.pending[u]))))
                up.core = False
        self.changed = []
        return records
