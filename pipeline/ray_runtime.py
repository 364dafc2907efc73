"""Connecting a stage to Ray: the same call on a laptop, a Slurm allocation or a KubeRay pod."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import ray
from ray._private import ray_constants

from pipeline.config import RayConfig

LOOPBACK = "127.0.0.1"
RAY_AUTH_LOG = "ray._private.authentication.authentication_token_setup"  # where Ray warns about its token-auth default


def completed(pending: dict) -> Iterator[tuple[Any, Any]]:
    """(what each ref was filed under, its result), in finishing order. The caller may add refs to
    ``pending`` between results: they are waited for too."""
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(ready[0]), ray.get(ready[0])


def on_actors(actors: Sequence, jobs: Sequence, call: Callable[[Any, Any], ray.ObjectRef], in_flight: int = 2) -> Iterator[tuple[Any, Any]]:
    """(job, result) for every job, in finishing order, ``call(actor, job)`` running each on one of ``actors``.

    Each actor walks its own contiguous run of ``jobs`` in order, so a job meets what the one before
    it left in the actor (open slides, decoded tiles of the same slide). An actor whose run is done
    takes the back half of the longest run left, so none idles while jobs wait. Each actor has up to
    ``in_flight`` calls submitted, so it never waits for the driver between two jobs.
    """
    runs = [deque(jobs[len(jobs) * i // len(actors) : len(jobs) * (i + 1) // len(actors)]) for i in range(len(actors))]
    pending: dict = {}  # ref -> (actor index, job)

    def feed(index: int) -> None:
        while sum(1 for owner, _ in pending.values() if owner == index) < in_flight:
            if not runs[index]:
                longest = max(runs, key=len)
                runs[index].extend(reversed([longest.pop() for _ in range((len(longest) + 1) // 2)]))
            if not runs[index]:
                return
            job = runs[index].popleft()
            pending[call(actors[index], job)] = (index, job)

    for index in range(len(actors)):
        feed(index)
    for (index, job), result in completed(pending):
        feed(index)
        yield job, result


@contextmanager
def ray_session(settings: RayConfig) -> Iterator[None]:
    """Join the cluster at ``settings.address``, or start a local Ray; shut down only what we started."""
    if ray.is_initialized():
        yield
        return
    if settings.address:
        ray.init(address=settings.address, logging_level=logging.WARNING)
    else:
        _start_local_ray(settings.num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


def _start_local_ray(num_cpus: int | None) -> None:
    """A fresh Ray on this machine ("local": never one a stray `ray start` left behind), reachable from
    this machine only.

    Ray (2.60) binds its gRPC servers (GCS, raylet, workers), agents and metrics ports to every
    interface unless the node's address is exactly the loopback, and on Linux it rewrites a loopback
    ``_node_ip_address`` to the machine's network address, except where it treats the machine as no
    cluster node (``ENABLE_RAY_CLUSTER``, the switch macOS and Windows have off). That switch is off
    while the node starts; the node's address is then kept, and every process it starts is given it.
    tests/test_ray_runtime.py lists the listening sockets of a local session.

    Ray's own default for a new local cluster, token authentication (a token in ~/.ray/auth_token,
    made if missing), is kept; its warning that the default is on is not printed on every command.
    """
    auth_log = logging.getLogger(RAY_AUTH_LOG)
    auth_level = auth_log.level
    auth_log.setLevel(logging.ERROR)
    cluster_node, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        ray.init(
            address="local", num_cpus=num_cpus, include_dashboard=False,
            logging_level=logging.WARNING, _node_ip_address=LOOPBACK,
        )
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_node
        auth_log.setLevel(auth_level)
