"""Consistent-hash ring with virtual nodes, precomputed as a partition -> owners table."""

cimport cython
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcpy

from xxhash import xxh3_64_intdigest as _xxh3

from hypercache.errors import ConfigError

# Measured in docs/ring.md: with 2048 vnodes per node the replica load of every
# node stays within a few percent of the ideal for 3..10 nodes; primaries are
# balanced exactly by the owner-set step below, whatever the vnode count.
DEFAULT_VNODES = 2048
DEFAULT_PARTITIONS = 4096
DEFAULT_REPLICATION = 3

# Bounds that keep every table and token array small enough to build in
# milliseconds and every index inside a uint32.
MAX_PARTITION_BITS = 20
MAX_VNODES = 65536
MAX_NODES = 65535
MAX_REPLICATION = 64
MAX_TOKENS = 1 << 24

cdef uint32_t NONE = 0xFFFFFFFFu


ctypedef struct Token:
    uint64_t point
    uint32_t node


cdef int _cmp_token(const void* a, const void* b) noexcept nogil:
    # Total order on (point, node): two nodes whose vnodes hash to the same point
    # (a 2**-64 event) still sort the same way in every process.
    cdef const Token* x = <const Token*>a
    cdef const Token* y = <const Token*>b
    if x.point < y.point:
        return -1
    if x.point > y.point:
        return 1
    if x.node < y.node:
        return -1
    if x.node > y.node:
        return 1
    return 0


cdef object _check_int(str name, object value, long long lo, long long hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an int, got {type(value).__name__}")
    if value < lo or value > hi:
        raise ConfigError(name, f"must be between {lo} and {hi}, got {value}")
    return value


cdef uint32_t _partition_bits(object partitions) except? 0xFFFFFFFF:
    _check_int("partitions", partitions, 1, 1 << MAX_PARTITION_BITS)
    if partitions & (partitions - 1):
        raise ConfigError("partitions", f"must be a power of two, got {partitions}")
    return <uint32_t>(partitions.bit_length() - 1)


cdef list _check_nodes(str field, object node_ids):
    # Returns the ids as given (a list); callers sort.
    if isinstance(node_ids, (str, bytes)):
        raise ConfigError(field, "must be a sequence of node ids, not a single string")
    try:
        ids = list(node_ids)
    except TypeError:
        raise ConfigError(field, "must be a sequence of str") from None
    if not ids:
        raise ConfigError(field, "must name at least one node")
    if len(ids) > MAX_NODES:
        raise ConfigError(field, f"at most {MAX_NODES} nodes")
    for nid in ids:
        if not isinstance(nid, str):
            raise ConfigError(field, f"node ids must be str, got {type(nid).__name__}")
        if not nid:
            raise ConfigError(field, "node ids must not be empty")
    ordered = sorted(ids)
    for i in range(1, len(ordered)):
        if ordered[i] == ordered[i - 1]:
            raise ConfigError(field, f"duplicate node id {ordered[i]!r}")
    return ids


# -- primary selection ---------------------------------------------------------
#
# The ring walk fixes each partition's owner SET; which member of the set is the
# primary is free, because changing it moves no data. Left to the walk, primaries
# are as unbalanced as vnode arcs are (5-15% off the ideal at 4096 partitions,
# measured in docs/ring.md). So primaries are chosen as a balanced assignment:
# every node gets floor(P/n) or ceil(P/n) primaries, each partition's primary
# being one of its own owners.
#
# First a greedy pass in partition order takes the first owner in walk order that
# is below the cap. Partitions whose owners are all full go through an augmenting
# path search (a BFS over nodes: "move some partition of full node x to another
# of its owners y", until a y with room is found), the textbook step of bipartite
# b-matching. It runs twice: with cap floor(P/n) for everyone, then with cap
# floor(P/n)+1 for the P mod n partitions left over. If an assignment within the
# caps does not exist (owner sets far out of balance: tiny vnode counts), the
# partition goes to its least-loaded owner.
#
# Cost: the greedy pass is O(P*w); each search scans the partitions once per BFS
# layer, O(P*w*depth), and runs only for the few dozen partitions the greedy pass
# leaves (measured <= 50 at P = 4096). Everything is a pure function of the owner
# sets, so it is as deterministic as they are.

cdef int _augment(uint32_t u, uint32_t cap, uint32_t* rows, uint32_t w, uint32_t P,
                  uint32_t n, uint32_t* prim, uint32_t* cnt, uint32_t* seen,
                  uint32_t* depth, uint32_t* via_part, uint32_t* via_node,
                  uint32_t stamp) noexcept nogil:
    cdef uint32_t j, q, x, y, d = 0, target = NONE
    cdef bint grew
    for j in range(w):
        y = rows[<size_t>u * w + j]
        if seen[y] != stamp:
            seen[y] = stamp
            depth[y] = 0
            via_part[y] = u
            via_node[y] = NONE
            if cnt[y] < cap and target == NONE:
                target = y
    while target == NONE:
        grew = False
        for q in range(P):
            x = prim[q]
            if x == NONE or seen[x] != stamp or depth[x] != d:
                continue
            for j in range(w):
                y = rows[<size_t>q * w + j]
                if seen[y] == stamp:
                    continue
                seen[y] = stamp
                depth[y] = d + 1
                via_part[y] = q
                via_node[y] = x
                grew = True
                if cnt[y] < cap:
                    target = y
                    break
            if target != NONE:
                break
        if not grew:
            return 0
        d += 1
    # Flip the path: each partition on it moves one step towards the target; only
    # the target's count grows, every other node on the path gives one and takes one.
    y = target
    cnt[y] += 1
    while True:
        q = via_part[y]
        x = via_node[y]
        prim[q] = y
        if x == NONE:
            break
        y = x
    return 1


cdef int _balance_primaries(uint32_t* rows, uint32_t P, uint32_t w, uint32_t n) except -1:
    cdef uint32_t* prim = <uint32_t*>malloc(P * sizeof(uint32_t))
    cdef uint32_t* pending = <uint32_t*>malloc(P * sizeof(uint32_t))
    cdef uint32_t* cnt = <uint32_t*>calloc(n, sizeof(uint32_t))
    cdef uint32_t* seen = <uint32_t*>calloc(n, sizeof(uint32_t))
    cdef uint32_t* depth = <uint32_t*>malloc(n * sizeof(uint32_t))
    cdef uint32_t* via_part = <uint32_t*>malloc(n * sizeof(uint32_t))
    cdef uint32_t* via_node = <uint32_t*>malloc(n * sizeof(uint32_t))
    cdef uint32_t p, j, k, o, best, npend = 0, nleft, stamp = 0
    cdef uint32_t cap = P // n
    cdef uint32_t tmp[64]
    try:
        if (prim == NULL or pending == NULL or cnt == NULL or seen == NULL
                or depth == NULL or via_part == NULL or via_node == NULL):
            raise MemoryError()
        for p in range(P):
            prim[p] = NONE
            for j in range(w):
                o = rows[<size_t>p * w + j]
                if cnt[o] < cap:
                    prim[p] = o
                    cnt[o] += 1
                    break
            if prim[p] == NONE:
                pending[npend] = p
                npend += 1
        for k in range(2):
            nleft = 0
            for j in range(npend):
                p = pending[j]
                stamp += 1
                if not _augment(p, cap, rows, w, P, n, prim, cnt, seen, depth,
                                via_part, via_node, stamp):
                    pending[nleft] = p
                    nleft += 1
            npend = nleft
            cap += 1
        for j in range(npend):
            # No assignment within the caps exists: least-loaded owner wins.
            p = pending[j]
            best = rows[<size_t>p * w]
            for k in range(1, w):
                o = rows[<size_t>p * w + k]
                if cnt[o] < cnt[best]:
                    best = o
            prim[p] = best
            cnt[best] += 1
        # Rewrite each row as primary first, then the others in walk order.
        for p in range(P):
            o = prim[p]
            tmp[0] = o
            k = 1
            for j in range(w):
                if rows[<size_t>p * w + j] != o:
                    tmp[k] = rows[<size_t>p * w + j]
                    k += 1
            memcpy(&rows[<size_t>p * w], tmp, w * sizeof(uint32_t))
    finally:
        free(prim)
        free(pending)
        free(cnt)
        free(seen)
        free(depth)
        free(via_part)
        free(via_node)
    return 0


cdef int _setup(Ring ring, tuple nodes, uint32_t bits, uint32_t replication,
                uint32_t vnodes) except -1:
    cdef uint32_t n = <uint32_t>len(nodes)
    ring.nodes = nodes
    ring.index = {nid: i for i, nid in enumerate(nodes)}
    ring.bits = bits
    ring.partitions = (<uint32_t>1) << bits
    ring.replication = replication
    ring.vnodes = vnodes
    ring.width = replication if replication < n else n
    free(ring.tab)
    ring.tab = <uint32_t*>malloc(<size_t>ring.partitions * ring.width * sizeof(uint32_t))
    if ring.tab == NULL:
        raise MemoryError()
    return 0


cdef int _walk(Ring ring, const Token* toks, size_t ntok) except -1:
    # Each partition starts at the MIDPOINT of its hash range and walks the
    # sorted tokens clockwise (increasing, wrapping at 2**64), collecting the
    # first ``width`` distinct nodes. The midpoint rather than the start: a
    # token that falls inside the range then splits it evenly on average, so
    # no end of the range is favoured.
    cdef uint32_t n = <uint32_t>len(ring.nodes)
    cdef uint32_t* seen = <uint32_t*>calloc(n, sizeof(uint32_t))
    if seen == NULL:
        raise MemoryError()
    cdef uint32_t p, got, node
    cdef uint32_t w = ring.width
    cdef uint64_t point
    cdef uint64_t half = (<uint64_t>1) << (63 - ring.bits)
    cdef size_t lo, hi, mid, pos
    cdef uint32_t* out
    for p in range(ring.partitions):
        point = ((<uint64_t>p << 1) << (63 - ring.bits)) + half
        # First token with point >= partition point (lower bound).
        lo = 0
        hi = ntok
        while lo < hi:
            mid = (lo + hi) >> 1
            if toks[mid].point < point:
                lo = mid + 1
            else:
                hi = mid
        pos = lo if lo < ntok else 0
        out = ring.tab + <size_t>p * w
        got = 0
        # ``seen`` holds p+1 for nodes already taken for this partition: no
        # clearing between partitions.
        while got < w:
            node = toks[pos].node
            if seen[node] != p + 1:
                seen[node] = p + 1
                out[got] = node
                got += 1
            pos += 1
            if pos == ntok:
                pos = 0
    free(seen)
    return 0


cdef uint32_t _check_partition(Ring ring, object p) except? 0xFFFFFFFF:
    if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < ring.partitions:
        raise IndexError(f"partition {p!r} out of range 0..{ring.partitions - 1}")
    return <uint32_t>p


@cython.final
cdef class Ring:
    """Partition -> owners table built from a consistent-hash ring of virtual nodes.

    See ring.pyi for the API and docs/ring.md for the placement rules.
    """

    def __cinit__(self, *args, **kwargs):
        self.tab = NULL
        self.nodes = ()
        self.index = {}

    def __dealloc__(self):
        free(self.tab)

    def __init__(self, node_ids, *, vnodes=DEFAULT_VNODES, partitions=DEFAULT_PARTITIONS,
                 replication=DEFAULT_REPLICATION):
        cdef tuple nodes = tuple(sorted(_check_nodes("node_ids", node_ids)))
        _check_int("vnodes", vnodes, 1, MAX_VNODES)
        _check_int("replication", replication, 1, MAX_REPLICATION)
        cdef uint32_t bits = _partition_bits(partitions)
        cdef uint32_t n = <uint32_t>len(nodes)
        cdef uint32_t V = <uint32_t>vnodes
        if <uint64_t>n * V > MAX_TOKENS:
            raise ConfigError("vnodes", f"{n} nodes x {V} vnodes exceeds {MAX_TOKENS} tokens")
        _setup(self, nodes, bits, <uint32_t>replication, V)
        cdef size_t ntok = <size_t>n * V
        cdef Token* toks = <Token*>malloc(ntok * sizeof(Token))
        if toks == NULL:
            raise MemoryError()
        cdef uint32_t i, j
        cdef size_t t = 0
        try:
            for j in range(n):
                nid = nodes[j]
                for i in range(V):
                    toks[t].point = _xxh3(f"{nid}#{i}".encode())
                    toks[t].node = j
                    t += 1
            qsort(toks, ntok, sizeof(Token), _cmp_token)
            _walk(self, toks, ntok)
        finally:
            free(toks)
        if self.width > 1:
            _balance_primaries(self.tab, self.partitions, self.width, n)

    @classmethod
    def from_table(cls, nodes, table, *, replication=None):
        """Rebuild a lookup-only ring from ``nodes`` and ``table`` (see ring.pyi)."""
        cdef list given = _check_nodes("nodes", nodes)
        cdef tuple ids = tuple(sorted(given))
        if list(ids) != given:
            raise ConfigError("nodes", "must be sorted, as Ring.nodes is")
        if isinstance(table, (str, bytes)):
            raise ConfigError("table", "must be a sequence of rows")
        try:
            rows = [list(row) for row in table]
        except TypeError:
            raise ConfigError("table", "must be a sequence of rows of node indexes") from None
        if not rows or len(rows) & (len(rows) - 1) or len(rows) > (1 << MAX_PARTITION_BITS):
            raise ConfigError("table", "must have one row per partition, a power of two "
                                       f"up to {1 << MAX_PARTITION_BITS}, got {len(rows)}")
        cdef uint32_t bits = <uint32_t>(len(rows).bit_length() - 1)
        cdef uint32_t n = <uint32_t>len(ids)
        width = len(rows[0])
        if replication is None:
            replication = width
        _check_int("replication", replication, 1, MAX_REPLICATION)
        if width != min(replication, n):
            raise ConfigError("table", f"rows must hold min(replication, nodes) = "
                                       f"{min(replication, n)} owners, got {width}")
        cdef Ring ring = Ring.__new__(Ring)
        _setup(ring, ids, bits, <uint32_t>replication, 0)
        cdef uint32_t p, j
        for p in range(ring.partitions):
            row = rows[p]
            if len(row) != width:
                raise ConfigError("table", f"row {p} has {len(row)} owners, expected {width}")
            for j in range(width):
                o = row[j]
                if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o < n:
                    raise ConfigError("table", f"row {p}: bad node index {o!r}")
                ring.tab[<size_t>p * width + j] = <uint32_t>o
            if len(set(row)) != width:
                raise ConfigError("table", f"row {p} repeats a node")
        return ring

    # -- lookups ----------------------------------------------------------------

    cdef uint32_t partition_of_hash(self, uint64_t h) noexcept:
        return partition_of_hash(h, self.bits)

    cdef const uint32_t* row(self, uint32_t p) noexcept:
        return self.tab + <size_t>p * self.width

    cdef list owners_list(self, uint32_t p):
        cdef const uint32_t* r = self.tab + <size_t>p * self.width
        cdef list out = PyList_New(self.width)
        cdef uint32_t j
        cdef object nid
        for j in range(self.width):
            nid = <object>PyTuple_GET_ITEM(self.nodes, r[j])
            Py_INCREF(nid)
            PyList_SET_ITEM(out, j, nid)
        return out

    def partition_of(self, bytes key not None):
        return partition_of_hash(_xxh3(key), self.bits)

    def owners(self, bytes key not None):
        return self.owners_list(partition_of_hash(_xxh3(key), self.bits))

    def partition_owners(self, p):
        return self.owners_list(_check_partition(self, p))

    def primary(self, p):
        cdef uint32_t q = _check_partition(self, p)
        return self.nodes[self.tab[<size_t>q * self.width]]

    def node_partitions(self, node_id):
        cdef object idx = self.index.get(node_id)
        if idx is None:
            raise KeyError(node_id)
        cdef uint32_t i = idx
        cdef uint32_t p, j
        cdef list out = []
        for p in range(self.partitions):
            for j in range(self.width):
                if self.tab[<size_t>p * self.width + j] == i:
                    out.append(p)
                    break
        return out

    def table(self):
        cdef uint32_t p, j
        cdef list out = []
        for p in range(self.partitions):
            out.append([self.tab[<size_t>p * self.width + j] for j in range(self.width)])
        return out

    def load(self):
        cdef uint32_t n = <uint32_t>len(self.nodes)
        cdef list prim = [0] * n
        cdef list rep = [0] * n
        cdef uint32_t p, j, o
        for p in range(self.partitions):
            o = self.tab[<size_t>p * self.width]
            prim[o] += 1
            for j in range(1, self.width):
                o = self.tab[<size_t>p * self.width + j]
                rep[o] += 1
        return {
            self.nodes[i]: {"primary": prim[i], "replica": rep[i], "owned": prim[i] + rep[i]}
            for i in range(n)
        }

    def moved(self, Ring other not None):
        if other.partitions != self.partitions:
            raise ValueError("rings have different partition counts")
        # Translate this ring's node indexes into the other's (NONE: absent there).
        cdef uint32_t n = <uint32_t>len(self.nodes)
        cdef list trans = [other.index.get(nid, NONE) for nid in self.nodes]
        cdef uint32_t* tr = <uint32_t*>malloc(n * sizeof(uint32_t))
        if tr == NULL:
            raise MemoryError()
        cdef uint32_t i, p, j, k, a, count = 0
        cdef bint same, found
        for i in range(n):
            tr[i] = trans[i]
        for p in range(self.partitions):
            same = self.width == other.width
            j = 0
            while same and j < self.width:
                a = tr[self.tab[<size_t>p * self.width + j]]
                found = False
                for k in range(other.width):
                    if other.tab[<size_t>p * other.width + k] == a:
                        found = True
                        break
                same = found
                j += 1
            if not same:
                count += 1
        free(tr)
        return count

    def __len__(self):
        return len(self.nodes)

    def __repr__(self):
        return (f"Ring(nodes={len(self.nodes)}, partitions={self.partitions}, "
                f"replication={self.replication}, vnodes={self.vnodes})")
