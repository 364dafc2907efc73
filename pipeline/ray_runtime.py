"""Connecting a stage to Ray: the same call on a laptop, a Slurm allocation or a KubeRay pod."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from pipeline.config import RayConfig


def completed(pending: dict) -> Iterator[tuple[Any, Any]]:
    """(what each ref was filed under, its result), in finishing order. The caller may add refs to
    ``pending`` between results: they are waited for too."""
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(ready[0]), ray.get(ready[0])


@contextmanager
def ray_session(settings: RayConfig) -> Iterator[None]:
    """Join the cluster at ``settings.address``, or start a local Ray; shut down only what we started."""
    if ray.is_initialized():
        yield
        return
    if settings.address:
        ray.init(address=settings.address, logging_level=logging.WARNING)
    else:
        # "local": always a fresh Ray on this machine, never one a stray `ray start` left behind.
        ray.init(address="local", num_cpus=settings.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()
