"""`hiad-runtime predict ... --ray ADDRESS` (extra `[ray]`): inputs scored by Ray actors, written here.

Each actor loads the bundle once (from its path: every node must see it there) and scores the inputs
it is sent, reading each from its path (relative paths from the driver's folder, where a node has it)
and returning a `Scored`: the record's fields and the map. The driver lists the inputs, keeps every
actor `DEPTH` calls busy, and hands the outcomes to the one writer in input order. Actors write
nothing, so a call retried on a restarted actor, or an input sent again to another actor after its
own died for good, is still recorded once; only when no actor is left does the run fail (the records
so far kept: `--resume` continues). Plain actors rather than Ray Data: the driver needs every
outcome in order and each retry in its own hands, and the scoring needs no `ray[data]` (pyarrow).
"""

from __future__ import annotations

import heapq
import os
import re
import socket
from pathlib import Path
from typing import Iterator

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from hiad_runtime.batch import Input, OutputSettings, Scored, describe, score_input
from hiad_runtime.options import RuntimeOptions

DEPTH = 2  # calls queued per actor: the next input is at the actor while the current one is scored
RESTARTS = 2  # restarts of a dead actor (node lost, out of memory); the calls it held are retried on it


class ScoringFailed(RuntimeError):
    """The run cannot go on: no actor left, or scoring raised something other than a bad input."""


def connect(address: str) -> bool:
    """'local' starts a Ray instance on this machine, 'auto' joins the cluster this machine is a node
    of (`ray start`), anything else is a cluster address (`HOST:6379` or `ray://HOST:10001`).
    Returns False when this process was already connected (then the caller must not shut Ray down)."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False if address == "local" else None)
    return True


def capacity(threads: int) -> int:
    """How many actors of `threads` CPUs the cluster's live nodes hold at once (an actor never spans nodes)."""
    return sum(int(node["Resources"].get("CPU", 0) // threads) for node in ray.nodes() if node["Alive"])


class Scorer:
    """A Ray actor's state: the bundle loaded once, scoring one input per call."""

    def __init__(self, bundle: str, options: RuntimeOptions, settings: OutputSettings, folder: str):
        from hiad_runtime.inspector import Inspector

        if os.path.isdir(folder):
            os.chdir(folder)  # the driver's folder: relative inputs resolve as they did there
        self.inspector = Inspector.load(bundle, options)
        self.settings = settings

    def describe(self) -> dict:
        """The runtime's description of this actor's inspector, with the node it runs on."""
        return {**describe(self.inspector), "node": socket.gethostname()}

    def score(self, item: Input) -> Scored:
        """Read and score one input on this actor (its decode errors come back as a record)."""
        return score_input(self.inspector, item, lambda: self.inspector.decode(item.path), self.settings)


class RayScorers:
    """`actors` Scorer actors of `options.threads` CPUs each on the connected cluster; `score(items)`.

    An actor gets inputs once it has started (placed, bundle loaded): one still waiting for CPUs on a
    busy cluster holds none, and joins when it answers."""

    def __init__(self, bundle: Path, options: RuntimeOptions, settings: OutputSettings, actors: int):
        threads = options.threads
        remote = ray.remote(Scorer).options(
            num_cpus=threads,
            max_restarts=RESTARTS,
            max_task_retries=RESTARTS,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},  # faiss: as many threads as reserved
        )
        args = (str(Path(bundle).resolve()), options, settings, os.getcwd())
        self.actors = [remote.remote(*args) for _ in range(actors)]
        self.starting = {actor.describe.remote(): actor for actor in self.actors}  # answered once started
        self.busy: dict = {}  # started actor -> calls it holds
        self.resent = 0  # inputs sent again because the actor holding them died for good

    def describe(self) -> dict:
        """The first started actor's description (thresholds, backend, its node); a bundle that does not
        load, by name."""
        (call,), _ = ray.wait(list(self.starting), num_returns=1)
        try:
            return self._started(call)
        except RayActorError as e:
            raise ScoringFailed(f"the actors could not load the bundle: {_cause(e)}") from None

    def _started(self, call) -> dict:
        actor = self.starting.pop(call)
        about = ray.get(call)
        self.busy[actor] = 0
        return about

    def score(self, items: list[Input]) -> Iterator[Scored]:
        """Every input's outcome, in input order. At most `DEPTH` calls per actor and a window of
        `2 * DEPTH * actors` inputs past the first one not yet done are out at once (bounded memory)."""
        waiting = list(range(len(items)))  # a heap: an input sent again goes before those not yet sent
        busy = self.busy
        out: dict = {}  # call -> (input index, actor)
        done: dict[int, Scored] = {}
        first = 0  # the first input not yet handed to the writer
        while first < len(items):
            window = first + 2 * DEPTH * max(len(busy), 1)
            for actor in busy:
                while busy[actor] < DEPTH and waiting and waiting[0] < window:
                    i = heapq.heappop(waiting)
                    out[actor.score.remote(items[i])] = (i, actor)
                    busy[actor] += 1
            (call,), _ = ray.wait([*out, *self.starting], num_returns=1)
            failure = None
            if call in self.starting:
                try:
                    self._started(call)
                except RayActorError as e:  # it could not start (its node, the bundle there): the others go on
                    failure = e
            else:
                i, actor = out.pop(call)
                try:
                    done[i] = ray.get(call)
                    if actor in busy:
                        busy[actor] -= 1
                except RayActorError as e:  # its actor died, after its restarts: another one scores the input
                    failure = e
                    heapq.heappush(waiting, i)
                    self.resent += 1
                    if isinstance(e, ActorDiedError):
                        busy.pop(actor, None)  # for good
                    elif actor in busy:
                        busy[actor] -= 1
                except RayTaskError as e:
                    raise ScoringFailed(f"{items[i].path}: {_cause(e)}") from None
            if failure is not None and not busy and not self.starting:
                raise ScoringFailed(f"every actor died; last: {_cause(failure)}") from None
            while first in done:
                yield done.pop(first)
                first += 1

    def close(self) -> None:
        """Stop every actor (not restarted)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _cause(error: Exception) -> str:
    """The first line that says what went wrong, not Ray's traceback around it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Error:" in line and not line.startswith(("ray.", "Traceback"))]
    cause = (named or lines or [type(error).__name__])[-1]
    return re.sub(r"^(\w+\.)+(?=\w+: )", "", cause)  # hiad_runtime.bundle.BundleError: ... -> BundleError: ...
