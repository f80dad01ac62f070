"""Clients of a hypercache cluster.

- :class:`Client`: blocking sockets, for sync code; safe to share between threads,
  and across ``os.fork()``; a :class:`ConnectionPool` of connections per node.
- :class:`AsyncClient`: asyncio, one multiplexed connection per node.

Both learn the partition table from any seed (``route="owner"``): reads go straight
to the key's owners (``R_GET``, resolved and read-repaired by the client), writes to
the key's primary, failing over to the other owners and then to any node. Values are
serialised with msgpack by default (:mod:`hypercache.client.serializer`); keys are
``str`` or ``bytes`` (:mod:`hypercache.client.keys`). ``docs/client.md`` is the guide.
"""

from hypercache.client._common import ClientStats
from hypercache.client.aio import AsyncClient
from hypercache.client.keys import Key, normalize_key
from hypercache.client.pool import ConnectionPool, PoolStats
from hypercache.client.serializer import (
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    RawSerializer,
    Serializer,
)
from hypercache.client.sync import Client
from hypercache.client.topology import NodeInfo, Topology

__all__ = [
    "AsyncClient",
    "Client",
    "ClientStats",
    "ConnectionPool",
    "JsonSerializer",
    "Key",
    "MsgpackSerializer",
    "NodeInfo",
    "PickleSerializer",
    "PoolStats",
    "RawSerializer",
    "Serializer",
    "Topology",
    "normalize_key",
]
