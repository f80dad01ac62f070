"""Key normalisation: what the clients accept as a key, and what goes on the wire.

A key on the wire is ``bytes``. The clients accept ``str`` (sent as UTF-8) and
``bytes`` (sent as is); ``"user:1"`` and ``b"user:1"`` therefore name the same
entry. Anything else is a :class:`TypeError`: integers, tuples and other objects
have no single obvious byte form, so the caller chooses one.

Keys are checked against the protocol :class:`~hypercache.net.protocol.Limits`
before anything is sent, so an oversized key fails fast with
:class:`~hypercache.errors.KeyTooLargeError` (a ``ValueError``) and no node sees it.
"""

from __future__ import annotations

from hypercache.errors import KeyTooLargeError
from hypercache.net.protocol import Limits

__all__ = ["Key", "normalize_key"]

#: What the clients accept as a key.
Key = str | bytes


def normalize_key(key: object, limits: Limits) -> bytes:
    """Return the wire form of ``key``.

    :param key: a ``str`` (encoded as UTF-8) or ``bytes`` (used as is).
    :param limits: the limits of the connection; ``len(result) <= limits.max_key``.
    :raises TypeError: ``key`` is neither ``str`` nor ``bytes``.
    :raises UnicodeEncodeError: a ``str`` key holds lone surrogates.
    :raises KeyTooLargeError: the key is longer than ``limits.max_key`` bytes.
    """
    if isinstance(key, bytes):
        data = key if type(key) is bytes else bytes(key)
    elif isinstance(key, str):
        data = key.encode()
    else:
        raise TypeError(f"key must be str or bytes, not {type(key).__name__}")
    if len(data) > limits.max_key:
        raise KeyTooLargeError(f"key of {len(data)} bytes exceeds max_key={limits.max_key}")
    return data
