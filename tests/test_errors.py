"""The error tree: whose fault each error says, and its wire codes."""

from __future__ import annotations

import pytest

from hypercache import errors
from hypercache.errors import (
    ClockSkewError,
    ConfigError,
    EntryTooLargeError,
    FrameTooLargeError,
    HandshakeError,
    HyperCacheError,
    KeyTooLargeError,
    NoAnswerError,
    ProtocolError,
    QuorumError,
    RequestTimeoutError,
    UsageError,
    ValueTooLargeError,
    error_from_wire,
    error_to_wire,
)


@pytest.mark.parametrize(
    "cls", [ConfigError, KeyTooLargeError, ValueTooLargeError, EntryTooLargeError]
)
def test_caller_mistakes_are_usage_errors_not_protocol_errors(cls: type[Exception]) -> None:
    assert issubclass(cls, UsageError) and issubclass(cls, ValueError)
    assert not issubclass(cls, ProtocolError)


@pytest.mark.parametrize("cls", [FrameTooLargeError, HandshakeError, ClockSkewError])
def test_protocol_breaches_are_protocol_errors(cls: type[Exception]) -> None:
    assert issubclass(cls, ProtocolError) and not issubclass(cls, UsageError)


def test_every_registered_code_round_trips_to_its_class() -> None:
    codes = errors._BY_CODE
    assert len(codes) == len(set(codes.values()))
    for code, cls in codes.items():
        assert cls.code == code
        if cls is ConfigError:
            exc: HyperCacheError = ConfigError("f", "m")
        elif cls is QuorumError:
            exc = QuorumError(1, 2)
        else:
            exc = cls("m")
        assert type(error_from_wire(error_to_wire(exc))) is cls
    # A local NoAnswerError travels as what it is to the other side: a timeout.
    assert type(error_from_wire(error_to_wire(NoAnswerError("x")))) is RequestTimeoutError


def test_a_code_cannot_be_registered_twice() -> None:
    class Twin(HyperCacheError):
        code = KeyTooLargeError.code

    with pytest.raises(AssertionError, match="taken by KeyTooLargeError"):
        errors._wire(Twin)
