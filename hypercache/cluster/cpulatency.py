"""A CPU latency request: ask the kernel to keep idle CPUs quick to wake.

Linux's PM QoS interface ``/dev/cpu_dma_latency`` takes a wake-up latency limit in
microseconds from any process that opens it and writes the limit as a 32-bit
integer; the limit holds, machine-wide, until that file is closed (also when the
process dies). With a limit of 0, idle CPUs poll instead of entering a sleep state
they would be slow to leave. tuned's ``latency-performance`` profile does the same.

Why a cache node would ask: a request that crosses processes wakes a CPU at every
hop. On a virtual machine whose idle vCPUs halt, each of those wakes is an exit to
the hypervisor; measured on the 2-vCPU machine of ``docs/benchmarks.md``, a
loopback round trip between two asyncio processes takes 55 µs with idle vCPUs
halting and 13 µs with them polling. The price is CPU time: idle CPUs spin rather
than sleep, for as long as the request is held. So it is off unless asked for
(``--cpu-latency-limit``), and asking needs the right to open the device (root).
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Final

__all__ = ["DEVICE", "CpuLatencyRequest"]

_log = logging.getLogger("hypercache.node")

#: The PM QoS CPU latency device.
DEVICE: Final = "/dev/cpu_dma_latency"
_S32: Final = struct.Struct("=i")


class CpuLatencyRequest:
    """One held CPU latency limit; :meth:`acquire`, later :meth:`release`.

    :param limit_us: the wake-up latency limit, in microseconds (>= 0).
    :param device: the PM QoS device (a parameter for tests).
    """

    def __init__(self, limit_us: int, *, device: str = DEVICE) -> None:
        if type(limit_us) is not int or not 0 <= limit_us <= 0x7FFFFFFF:
            raise ValueError(f"limit_us must be an int in 0..2**31-1, got {limit_us!r}")
        self.limit_us = limit_us
        self.device = device
        #: why the last :meth:`acquire` failed; None if it did not
        self.error: str | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        """Open the device and write the limit; return whether it is now held.

        A failure (no such device, no permission) is logged as a warning and kept
        in :attr:`error`: the node runs on without it.
        """
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            return self._failed(exc)
        try:
            written = os.write(fd, _S32.pack(self.limit_us))
            if written != _S32.size:
                raise OSError(f"short write ({written} of {_S32.size} bytes)")
        except OSError as exc:
            os.close(fd)
            return self._failed(exc)
        self._fd = fd
        self.error = None
        _log.info("holding a CPU wake-up latency limit of %d us (%s)", self.limit_us, self.device)
        return True

    def release(self) -> None:
        """Close the device, which drops the limit (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _failed(self, exc: OSError) -> bool:
        self.error = f"{self.device}: {exc.strerror or exc}"
        _log.warning(
            "cannot hold a CPU wake-up latency limit of %d us: %s; running without it",
            self.limit_us,
            self.error,
        )
        return False
