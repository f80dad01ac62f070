# Consistent-hash ring of virtual nodes, folded into a partition -> owners table.
#
# The key space is cut into ``partitions`` = 2**bits equal ranges by the top bits
# of the key's xxh3_64 hash. The ring of vnode tokens is walked once, when the ring
# is built, to give every partition its owner list; afterwards a lookup is one
# shift and one row of a C array. The table, not the ring, is what the cluster
# agrees on and what clients download (``Ring.from_table``). docs/ring.md has the
# placement rules and the measured balance.

from libc.stdint cimport uint32_t, uint64_t


# Partition of a 64-bit key hash: its top ``bits`` bits, i.e. h >> (64 - bits).
# Written as two shifts so that bits == 0 (one partition) is not a shift by 64,
# which C leaves undefined. Shared with vstore.pyx: both must agree bit for bit.
cdef inline uint32_t partition_of_hash(uint64_t h, uint32_t bits) noexcept nogil:
    return <uint32_t>((h >> 1) >> (63 - bits))


cdef class Ring:
    # Node ids, sorted; a node's index in this tuple is what the table stores.
    cdef readonly tuple nodes
    cdef readonly uint32_t partitions
    # Replication factor asked for; rows hold min(replication, len(nodes)).
    cdef readonly uint32_t replication
    # Virtual nodes per node; 0 for a lookup-only ring built from a table.
    cdef readonly uint32_t vnodes
    cdef uint32_t bits
    # Owners per partition (row width of ``tab``).
    cdef uint32_t width
    # partitions x width node indexes; row p lists partition p's owners, its
    # primary first, then the other replicas in ring-walk order.
    cdef uint32_t* tab
    # node id -> index into ``nodes``.
    cdef dict index

    cdef uint32_t partition_of_hash(self, uint64_t h) noexcept
    cdef const uint32_t* row(self, uint32_t p) noexcept
    cdef list owners_list(self, uint32_t p)
