"""A steady client workload recorded into a :class:`~chaos.history.History`.

Every writer thread owns its keys and writes them in turn with unique values (so a
key's versions order its writes); reader threads read random keys of every writer.
All operations are QUORUM. Writers take the write paths in turn (by default the even
ones write through a node, ``write_path="proxy"``, the odd ones straight to the
owners, ``"direct"``): the injected faults act on the links between nodes, which a
proxied write crosses and a direct one does not, so a run covers both. Start it, do
harm to the cluster, stop it.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

from chaos.history import History
from hypercache import Client


class Workload:
    """``writers`` writer threads of ``keys_per_writer`` keys each and ``readers``
    reader threads, against the nodes at ``seeds``.

    :param timeout: each client's request deadline, seconds.
    :param pause: seconds a thread waits between two operations (0: none).
    :param prefix: of every key (workloads of one history need different ones).
    :param write_paths: the ``write_path`` of writer ``n`` is ``write_paths[n % len]``.
    """

    def __init__(
        self,
        seeds: Sequence[str],
        history: History,
        *,
        writers: int = 8,
        readers: int = 2,
        keys_per_writer: int = 20,
        timeout: float = 5.0,
        pause: float = 0.002,
        prefix: str = "",
        write_paths: Sequence[str] = ("proxy", "direct"),
    ) -> None:
        self.prefix = prefix
        self.write_paths = tuple(write_paths)
        self.seeds = list(seeds)
        self.history = history
        self.writers = writers
        self.readers = readers
        self.keys_per_writer = keys_per_writer
        self.timeout = timeout
        self.pause = pause
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def writers_on(self, write_path: str) -> set[int]:
        """The writer processes that write by ``write_path``."""
        paths = self.write_paths
        return {t for t in range(self.writers) if paths[t % len(paths)] == write_path}

    def keys_of(self, writer: int) -> list[str]:
        return [f"{self.prefix}w{writer}-k{j}" for j in range(self.keys_per_writer)]

    def start(self) -> None:
        for t in range(self.writers):
            self._spawn(self._write, t)
        for r in range(self.readers):
            self._spawn(self._read, self.writers + r)

    def stop(self) -> None:
        """Stop every thread and wait for it (what a thread raised is re-raised)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        if self.errors:
            raise self.errors[0]

    def _spawn(self, target: object, process: int) -> None:
        def run() -> None:
            try:
                assert callable(target)
                target(process)
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=run, name=f"chaos-client-{process}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _client(self, write_path: str = "direct") -> Client:
        return Client(self.seeds, timeout=self.timeout, consistency="quorum", write_path=write_path)

    def _write(self, process: int) -> None:
        keys = self.keys_of(process)
        paths = self.write_paths
        with self._client(paths[process % len(paths)]) as client:
            i = 0
            while not self._stop.is_set():
                self.history.write(client, process, keys[i % len(keys)], i // len(keys))
                i += 1
                if self.pause:
                    self._stop.wait(self.pause)

    def _read(self, process: int) -> None:
        rng = random.Random(process)
        with self._client() as client:
            while not self._stop.is_set():
                writer = rng.randrange(self.writers)
                key = f"{self.prefix}w{writer}-k{rng.randrange(self.keys_per_writer)}"
                self.history.read(client, process, key)
                if self.pause:
                    self._stop.wait(self.pause)
