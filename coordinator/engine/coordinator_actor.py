"""Coordinator: the Ray actor that plans the exchanges, links the towers and supervises them.

It carries no tensor, and it is not on a step's path. From the layer table it makes the exchange
plan (the points, each tower's share, the ranks) and forms the towers' process groups, in
generations (links.py): again after any failed call, and with a replaced tower. When a call of
the towers fails, it probes them and names the ones that died or hung (TowerFailure: the failure
policy's probe, failures.py).

Each step is one call to each tower, which runs the whole step, its exchanges inside it; the
driver's handle (model.py) submits those calls itself: through this actor they would cost a hop
each way, and the CPU time of both (docs/performance.md, "Training step").
"""

from __future__ import annotations

from typing import Sequence

import ray

from coordinator.engine.failures import TowerFailure, named, unanswered
from coordinator.engine.links import JOIN_TIMEOUT, ExchangePlan
from towers import NetConfig


def in_groups(per_tower: list, towers: int) -> list[list]:
    """A list in tower order, group-major (tower i is tower i % T of group i // T), cut into each group's part."""
    return [per_tower[i : i + towers] for i in range(0, len(per_tower), towers)]


class Coordinator:
    """Plans the exchanges, links the towers and supervises them: every data-parallel group of
    towers (one unless replicas > 1), towers[g * T : (g + 1) * T] being group g's T towers."""

    def __init__(self, config: NetConfig, backend: tuple[str, bool], timeout: float, replicas: int = 1):
        self.replicas, self.backend, self.timeout = replicas, backend, timeout
        self.rebuild(config)
        self.generation = -1
        self.kinds: dict[str, set] = {}  # link name -> what carries its collectives
        self.towers: list = []  # none until the engine, its towers started, asks it to connect them

    def rebuild(self, config: NetConfig) -> None:
        """Plan the exchanges of another network (its towers rebuilt in place); connect links them."""
        self.config = config
        self.plan = ExchangePlan.of(config, self.backend[0], self.timeout, shared_memory=self.backend[1])

    def describe(self) -> str:
        """What carries the exchanges, as GetModelInfo and `alexnet-mp info` report it: e.g.
        "shared memory" for a pair on one host, "gloo" or "nccl" between hosts and GPUs."""
        pair = " and ".join(sorted(self.kinds.get("pair", ())))
        replicas = " and ".join(sorted(self.kinds.get("replicas", ())))
        return pair + (f"; replicas over {replicas}" if replicas else "")

    def connect(self, towers: Sequence) -> int:
        """Link these towers, as the groups' next generation (a replaced tower joins like the others).

        Every tower must answer first: one that is dead or hung is named in a TowerFailure, and
        the others are not asked to wait for it.
        """
        self.towers = list(towers)
        probes = [t.describe.remote() for t in self.towers]
        lost = unanswered(probes)
        if lost:
            raise TowerFailure(f"cannot link the towers: {named(lost)}", list(lost))
        node = {tower: info["node"] for tower, info in zip(self.towers, ray.get(probes))}
        self.generation += 1
        links = [("pair", group) for group in in_groups(self.towers, self.config.towers)]
        if self.replicas > 1:
            links += [("replicas", list(column)) for column in zip(*in_groups(self.towers, self.config.towers))]
        addresses = ray.get([members[0].host_link.remote(name) for name, members in links], timeout=JOIN_TIMEOUT)
        joins = [
            (
                name,
                tower.join_link.remote(
                    name,
                    address,
                    rank,
                    len(members),
                    self.generation,
                    self.plan,
                    self.plan.shared_memory and len({node[m] for m in members}) == 1,
                ),
            )
            for (name, members), address in zip(links, addresses)
            for rank, tower in enumerate(members)
        ]
        kinds = ray.get([join for _, join in joins], timeout=JOIN_TIMEOUT)
        self.kinds = {}
        for (name, _), kind in zip(joins, kinds):
            self.kinds.setdefault(name, set()).add(kind)
        return self.generation

    def ping(self) -> int:
        """Liveness, touching no tower: the generation of the links."""
        return self.generation

    def diagnose(self, error: str, before_update: bool) -> None:
        """After a failed call of the towers (`error` its summary): clear the towers that answer,
        and name those that do not in a TowerFailure (before_update: no surviving tower had
        updated). When every tower answers, the groups are formed again: a collective that
        failed leaves its group unusable, and a new generation is cheap."""
        lost = unanswered([t.abandon_step.remote() for t in self.towers])
        if lost:
            raise TowerFailure(
                f"{named(lost)} during the step, which was abandoned ({error})", list(lost), before_update
            )
        self.connect(self.towers)
