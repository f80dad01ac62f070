"""A simulated SWIM cluster: N real :class:`~hypercache.cluster.swim.Swim` state
machines over a simulated message layer (no sockets, no event loop, no wall clock).

Time advances in whole probe periods (*rounds*). In each round every running node,
in a random order, starts its period (:meth:`Swim.tick`), pings the suspects it
notices, and runs its probe: a direct ping and its ack, then, with no ack, a
``PING_REQ`` to each helper, which pings the target and answers. Every message
carries the sender's piggy-backed records (:meth:`Swim.gossip`) and is merged by its
receiver (:meth:`Swim.receive`), exactly as :mod:`hypercache.cluster.membership`
does over the network; every message is lost with probability ``loss``, and a
stopped node neither answers nor sends. A message is delivered at once: a round is
a period in which every probe completes, as it does when the network's round trips
are well within the probe timeout. Optionally every ``push_pull_every`` rounds each
node exchanges whole tables with one random alive member (``Op.MEMBERS``).

It is what ``tests/test_swimsim.py`` and ``bench/bench_swim.py`` run::

    sim = SimCluster(128, loss=0.1, seed=7)
    sim.stop(5)
    sim.run(50)
    assert not sim.false_dead
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from hypercache.cluster.swim import State, Swim, SwimSettings

__all__ = ["DEFAULT_SETTINGS", "SimCluster", "SimNode", "convergence_rounds"]

#: The simulated wall clock starts here (ms): incarnations are taken from it.
_EPOCH_MS = 1_700_000_000_000


#: The simulation's detector: a period of 1 s, the defaults of a node otherwise.
DEFAULT_SETTINGS: Final = SwimSettings(
    period=1.0, probe_timeout=0.5, failure_timeout=2.0, suspect_timeout=5.0, indirect_probes=3
)


@dataclass(eq=False)
class SimNode:
    """One simulated node: its state machine, and whether it runs."""

    node_id: str
    swim: Swim
    running: bool = True


class SimCluster:
    """``size`` simulated nodes ``s0`` .. ``s{size-1}`` that all know each other.

    :param loss: probability that any one message is lost.
    :param seed: seeds every random choice (the nodes' and the network's).
    :param push_pull_every: rounds between two whole-table exchanges per node (0:
        piggy-backed gossip only).
    :param settings: the detector's (:data:`DEFAULT_SETTINGS`: a period of 1 s,
        ``suspect_timeout`` 5 s, 3 helpers).
    :param dead: indexes of nodes that are stopped, and held as dead by every other
        node from the start.
    """

    def __init__(
        self,
        size: int,
        *,
        loss: float = 0.0,
        seed: int = 0,
        push_pull_every: int = 0,
        settings: SwimSettings = DEFAULT_SETTINGS,
        dead: Iterable[int] = (),
    ) -> None:
        self.rng = random.Random(seed)
        self.loss = loss
        self.push_pull_every = push_pull_every
        self.settings = settings
        self.now = 0.0
        #: rounds run so far
        self.round = 0
        #: messages sent (delivered or lost)
        self.messages = 0
        #: members that some node held as dead while they ran: (round, node, member)
        self.false_dead: list[tuple[int, str, str]] = []
        #: node id -> side of a partition: messages between sides are lost
        self.sides: dict[str, int] = {}
        self.nodes: list[SimNode] = []
        self.by_id: dict[str, SimNode] = {}
        for i in range(size):
            self._add(f"s{i}", _EPOCH_MS + i)
        table = [node.swim.me.record() for node in self.nodes]
        for i in dead:
            self.nodes[i].running = False
            table[i][3] = int(State.DEAD)
        for node in self.nodes:
            node.swim.seed_table(table, self.now)

    def _add(self, node_id: str, incarnation: int) -> SimNode:
        rng = random.Random(self.rng.getrandbits(64))
        swim = Swim(
            node_id,
            f"sim:{node_id}",
            incarnation=incarnation,
            settings=self.settings,
            now=self.now,
            wall_ms=self._wall_ms,
            rng=rng,
        )
        node = SimNode(node_id, swim)
        swim.on_liveness = self._watch(node)
        self.nodes.append(node)
        self.by_id[node_id] = node
        return node

    def _wall_ms(self) -> int:
        return _EPOCH_MS + int(self.now * 1000)

    def _watch(self, node: SimNode) -> Callable[[str, bool], None]:
        def liveness(member: str, _up: bool) -> None:
            if node.swim.state_of(member) is State.DEAD and self.by_id[member].running:
                self.false_dead.append((self.round, node.node_id, member))

        return liveness

    # ------------------------------------------------------------- the network

    def _delivered(self, src: SimNode, dst: SimNode) -> bool:
        self.messages += 1
        sides = self.sides
        if sides and sides.get(src.node_id) != sides.get(dst.node_id):
            return False
        return self.rng.random() >= self.loss

    def _ping(self, src: SimNode, dst: SimNode) -> bool:
        """A ping and its ack, each piggy-backing gossip; whether the ack came back."""
        records = src.swim.gossip(dst.node_id)
        if not self._delivered(src, dst) or not dst.running:
            return False
        dst.swim.receive(records, self.now)
        answer = dst.swim.gossip(src.node_id)
        if not self._delivered(dst, src):
            return False
        src.swim.receive(answer, self.now)
        return True

    def _ping_req(self, src: SimNode, helper: SimNode, target: SimNode) -> bool:
        records = src.swim.gossip(helper.node_id)
        if not self._delivered(src, helper) or not helper.running:
            return False
        helper.swim.receive(records, self.now)
        acked = self._ping(helper, target)
        answer = helper.swim.gossip(src.node_id)
        if not self._delivered(helper, src):
            return False
        src.swim.receive(answer, self.now)
        return acked

    def _push_pull(self, src: SimNode, dst: SimNode) -> None:
        table = src.swim.table()
        if not self._delivered(src, dst) or not dst.running:
            return
        dst.swim.receive(table, self.now)
        answer = dst.swim.table()
        if self._delivered(dst, src):
            src.swim.receive(answer, self.now)

    # ------------------------------------------------------------------ rounds

    def step(self) -> None:
        """Run one round (see the module docstring)."""
        self.round += 1
        self.now = self.round * self.settings.period
        order = [node for node in self.nodes if node.running]
        self.rng.shuffle(order)
        for node in order:
            swim = node.swim
            swim.tick(self.now)
            for member in swim.notices():
                self._ping(node, self.by_id[member])
            probe = swim.next_probe(self.now)
            if probe is not None:
                target = self.by_id[probe.target]
                result = "ack" if self._ping(node, target) else ""
                if not result:
                    acks = [
                        self._ping_req(node, self.by_id[helper], target)
                        for helper in swim.helpers(probe)
                    ]
                    result = "indirect" if any(acks) else ""
                swim.end_probe(probe, result, self.now)
            every = self.push_pull_every
            if every and self.round % every == 0:
                alive = [
                    nid
                    for nid, m in swim.members.items()
                    if m.state is State.ALIVE and nid != node.node_id
                ]
                if alive:
                    self._push_pull(node, self.by_id[self.rng.choice(alive)])

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self.step()

    def run_until(self, condition: Callable[[], bool], limit: int) -> int | None:
        """Rounds run until ``condition`` held (checked after each round), or
        ``None`` when it did not within ``limit`` rounds."""
        for n in range(1, limit + 1):
            self.step()
            if condition():
                return n
        return None

    # ------------------------------------------------------------------ events

    def stop(self, index: int) -> None:
        """Node ``index`` stops: it neither answers nor sends any more."""
        self.nodes[index].running = False

    def leave(self, index: int) -> None:
        """Node ``index`` leaves (it keeps answering, as a leaving node does)."""
        self.nodes[index].swim.leave(self.now)

    def split(self, *groups: range) -> None:
        """Partition the network: nodes of different groups (by index) no longer
        reach each other; ``split()`` heals it."""
        self.sides = {
            self.nodes[i].node_id: side for side, group in enumerate(groups) for i in group
        }

    def converged(self) -> bool:
        """Whether every running node has the same membership version."""
        versions = {node.swim.version for node in self.nodes if node.running}
        return len(versions) == 1

    def states_of(self, member: str) -> dict[str, State | None]:
        """What each running node holds ``member`` as."""
        return {
            node.node_id: node.swim.state_of(member)
            for node in self.nodes
            if node.running and node.node_id != member
        }


def convergence_rounds(
    size: int,
    seed: int,
    *,
    loss: float = 0.0,
    limit: int = 1000,
    settings: SwimSettings = DEFAULT_SETTINGS,
) -> int:
    """Rounds for one update made on one node to reach every node of a cluster of
    ``size`` by piggy-backed gossip alone (no push-pull), until every node's
    membership version is the same: one member is dead everywhere, and one node
    removes it (as ``POST /cluster/remove`` does).

    :raises AssertionError: not converged within ``limit`` rounds.
    """
    gone = random.Random(seed).randrange(size)
    sim = SimCluster(size, loss=loss, seed=seed, settings=settings, dead=(gone,))
    member = sim.nodes[gone].node_id
    remover = sim.nodes[(gone + 1) % size]
    remover.swim.remove(member, sim.now)
    rounds = sim.run_until(sim.converged, limit)
    if rounds is None:
        raise AssertionError(f"{size} nodes did not converge in {limit} rounds")
    return rounds
