"""ray_session on a real local Ray: a local run's ports are reachable from this machine only."""

from __future__ import annotations

import ipaddress

import psutil
import ray

from pipeline.config import RayConfig
from pipeline.ray_runtime import ray_session


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


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1 is the loopback too


def test_a_local_session_listens_on_the_loopback_only():
    assert not ray.is_initialized()
    with ray_session(RayConfig(num_cpus=1)):
        ray.get(ray.remote(lambda: None).remote())  # a worker process with its own gRPC server
        addresses = listening_addresses()
    assert {"gcs_server", "raylet"} <= {name for name, listening in addresses.items() if listening}, addresses
    exposed = {name: sorted(a for a in listening if not is_loopback(a)) for name, listening in addresses.items()}
    assert not any(exposed.values()), f"listening beyond the loopback: {exposed}"
