"""A FedAvg round over TLS between separate network hosts, made with network namespaces.

Each node and the coordinator get their own namespace, joined by veth pairs on private
10.200.x.0/24 links that exist only between these namespaces: the coordinator reaches each
node at that node's own address, not over loopback. Skipped where namespaces cannot be
made (no iproute2, or no CAP_SYS_ADMIN).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import TINY_PLAN_ARGS
from fedseg.node.launcher import NodeProcess
from fedseg.node.synthetic import write_federation

PORT = 8443


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts():
    """The coordinator's namespace and, per node, its namespace and address."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip is not installed: cannot build network namespaces")
    tag = f"fs{os.getpid() % 100000}"
    coordinator = f"{tag}-c"
    try:
        _ip("netns", "add", coordinator)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here ({exc.stderr.strip()}): needs root or CAP_SYS_ADMIN")
    made = [coordinator]
    nodes = {}
    try:
        _ip("-n", coordinator, "link", "set", "lo", "up")
        for i, name in enumerate(("site-a", "site-b"), start=1):
            ns = f"{tag}-{i}"
            _ip("netns", "add", ns)
            made.append(ns)
            # One veth pair per node: c<i> in the coordinator's namespace, n<i> in the node's.
            _ip("link", "add", f"{tag}c{i}", "netns", coordinator, "type", "veth", "peer", "name", f"{tag}n{i}", "netns", ns)
            _ip("-n", coordinator, "addr", "add", f"10.200.{i}.1/24", "dev", f"{tag}c{i}")
            _ip("-n", ns, "addr", "add", f"10.200.{i}.2/24", "dev", f"{tag}n{i}")
            for where, dev in ((coordinator, f"{tag}c{i}"), (ns, f"{tag}n{i}"), (ns, "lo")):
                _ip("-n", where, "link", "set", dev, "up")
            nodes[name] = (ns, f"10.200.{i}.2")
        yield coordinator, nodes
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_fedavg_round_over_tls_between_network_hosts(hosts, tmp_path):
    coordinator, where = hosts
    sites = write_federation(tmp_path / "data", n_per_site=30, size=32, seed=3)[:2]
    nodes = [NodeProcess(site.name, site, tmp_path / "nodes" / site.name, port=PORT, extra=["--host", where[site.name][1]],
                         run_in=["ip", "netns", "exec", where[site.name][0]]) for site in sites]
    try:
        invites = [node.wait_ready() for node in nodes]
        run = subprocess.run(["ip", "netns", "exec", coordinator, sys.executable, "-m", "fedseg", "run",
                              *[a for p in invites for a in ("--invite", str(p))], "--rounds", "1", "--out", str(tmp_path / "run"),
                              *TINY_PLAN_ARGS], capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "120"})
    finally:
        for node in nodes:
            node.stop()
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "round   1/1" in run.stdout
    for node, site in zip(nodes, sites):
        invite = (node.workdir / "invite.json").read_text()
        assert f'"url": "https://{where[site.name][1]}"' in invite
        log = (node.workdir / "node.log").read_text()
        assert "approved fedseg action" in log and "perimeter: refused" not in log
