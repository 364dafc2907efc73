"""ray_session on a real local Ray: a local run's ports are reachable from this machine only; on_actors's order."""

from __future__ import annotations

import ipaddress
import logging
import time

import psutil
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode

from pipeline.config import RayConfig
from pipeline.ray_runtime import RAY_AUTH_LOG, on_actors, ray_session


def listening_addresses() -> dict[str, set[str]]:
    """Process name -> the addresses its TCP sockets listen on, for this process and every process under it."""
    found: dict[str, set[str]] = {}
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            listening = {c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            found.setdefault(process.name(), set()).update(listening)
        except psutil.NoSuchProcess:  # a worker that ended meanwhile
            pass
    return found


class RecordedWarnings(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 is the loopback too


def test_a_local_session_listens_on_the_loopback_only_and_keeps_token_auth_without_a_warning():
    assert not ray.is_initialized()
    auth_log = logging.getLogger(RAY_AUTH_LOG)
    warnings = RecordedWarnings(level=logging.WARNING)
    auth_log.addHandler(warnings)
    try:
        with ray_session(RayConfig(num_cpus=1)):
            ray.get(ray.remote(lambda: None).remote())  # a worker process with its own gRPC server
            addresses = listening_addresses()
            mode = get_authentication_mode()
    finally:
        auth_log.removeHandler(warnings)
    assert mode == AuthenticationMode.TOKEN  # Ray's default for a new local cluster, kept
    assert warnings.messages == []  # ... without its warning on every command
    assert {"gcs_server", "raylet"} <= {name for name, listening in addresses.items() if listening}, addresses
    exposed = {name: sorted(a for a in listening if not is_loopback(a)) for name, listening in addresses.items()}
    assert not any(exposed.values()), f"listening beyond the loopback: {exposed}"


def test_on_actors_keeps_runs_in_order_and_no_actor_idles(tmp_path):
    """Actor a's run is 0-4, b's 5-9. a is stuck on job 0 (1 is queued behind it): b does its own run
    in order, then takes the back half of what a has left, twice, and every job runs once."""
    gate = tmp_path / "gate"

    class Recorder:  # defined here, so that Ray ships it by value (the tests folder is no package on the workers)
        """Runs a job by returning who ran it; job 0 waits until ``gate`` exists, so its actor stays busy."""

        def __init__(self, name: str):
            self.name = name

        def run(self, job: int) -> str:
            while job == 0 and not gate.exists():
                time.sleep(0.01)
            return self.name

    with ray_session(RayConfig(num_cpus=2)):
        recorder = ray.remote(num_cpus=1)(Recorder)
        actors = [recorder.remote(name) for name in "ab"]
        ran: dict[str, list[int]] = {"a": [], "b": []}
        for job, name in on_actors(actors, list(range(10)), lambda actor, job: actor.run.remote(job)):
            ran[name].append(job)
            if sum(map(len, ran.values())) == 8:
                gate.touch()
    assert ran == {"a": [0, 1], "b": [5, 6, 7, 8, 9, 3, 4, 2]}
