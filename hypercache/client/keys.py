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

from collections.abc import Iterable

from hypercache.errors import ConfigError, KeyTooLargeError
from hypercache.net.protocol import Limits

__all__ = ["Key", "normalize_key"]

#: What the clients accept as a key.
Key = str | bytes


def normalize_key(key: object, limits: Limits) -> bytes:
    """Return the wire form of ``key``.

    :param key: a ``str`` (encoded as UTF-8) or ``bytes`` (used as is).
    :param limits: the limits of the connection; ``len(result) <= limits.max_key``.
    :raises TypeError: ``key`` is neither ``str`` nor ``bytes``.
    :raises ConfigError: a ``str`` key cannot be encoded (lone surrogates).
    :raises KeyTooLargeError: the key is longer than ``limits.max_key`` bytes.
    """
    if isinstance(key, bytes):
        data = key if type(key) is bytes else bytes(key)
    elif isinstance(key, str):
        try:
            data = key.encode()
        except UnicodeEncodeError as exc:
            raise ConfigError("key", f"not encodable as UTF-8: {key!r:.60}") from exc
    else:
        raise TypeError(f"key must be str or bytes, not {type(key).__name__}")
    if len(data) > limits.max_key:
        raise KeyTooLargeError(f"key of {len(data)} bytes exceeds max_key={limits.max_key}")
    return data


def wire_keys(keys: Iterable[Key], limits: Limits) -> dict[bytes, list[Key]]:
    """Each wire key of ``keys`` with every key given for it, so that results can be
    keyed by what the caller passed ("k" and b"k" are one entry on the wire).

    :raises TypeError: ``keys`` is a single ``str`` or ``bytes``, not an iterable of keys.
    """
    if isinstance(keys, str | bytes):
        raise TypeError("keys must be an iterable of keys, not a single key")
    out: dict[bytes, list[Key]] = {}
    for key in keys:
        out.setdefault(normalize_key(key, limits), []).append(key)
    return out
