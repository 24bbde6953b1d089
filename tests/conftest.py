"""Shared fixtures: one synthetic federation of real node processes for the whole session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

NODE_MAX_MB = 4
#: Short, so the session's nodes delete every call's objects from their Syft stores while the
#: suite runs: every end-to-end test then also checks that this never cuts a call short.
NODE_SYFT_RETENTION_S = 5
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# The learnable task of the end-to-end tests: tiny, but the Dice must clearly rise.
TINY_PLAN_ARGS = ["--image-size", "32", "--width", "8", "--depth", "2", "--batch-size", "8", "--local-epochs", "2", "--lr", "0.003", "--seed", "0"]


def fedseg(*args: str, cwd: Path | None = None, timeout: float = 600, columns: int = 120) -> subprocess.CompletedProcess[str]:
    """Runs the ``fedseg`` command as a user would, in a separate process, its output to pipes."""
    return subprocess.run([sys.executable, "-m", "fedseg", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "COLUMNS": str(columns)})


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/data is not beside this checkout): real-data test skipped")
    return path


def _serve(root: Path, seed: int, extra: dict[str, list[str]]):
    """Writes three synthetic sites under ``root`` and serves each with a real node process."""
    from fedseg.node.launcher import NodeProcess
    from fedseg.node.synthetic import write_federation

    sites = write_federation(root / "data", n_per_site=30, size=32, seed=seed)
    nodes = {site.name: NodeProcess(site.name, site, root / "nodes" / site.name, extra=extra[site.name]) for site in sites}
    try:
        for node in nodes.values():
            node.wait_ready()
        yield nodes
    finally:
        for node in nodes.values():
            node.stop()


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory):
    """Three synthetic pixel-labelled sites, each served by a real ``fedseg node start`` process.

    Only site-a's owner lets its personalized model leave (``--share-personalized``).
    """
    # A small message limit lets the oversized-message test stay cheap.
    small = ["--max-message-mb", str(NODE_MAX_MB), "--syft-retention", str(NODE_SYFT_RETENTION_S)]
    # site-a lets its IOP-FL model leave for routing; site-c keeps its LC-Fed head to itself.
    # Every other algorithm ignores both flags.
    extra = {"site-a": [*small, "--share-personalized"], "site-b": small, "site-c": [*small, "--no-share-head"]}
    yield from _serve(tmp_path_factory.mktemp("federation"), 0, extra)


#: How each site of the mixed federation labels its images (weak labels derived from masks).
MIXED_LABELS = {"site-a": ["--labels", "pixel"], "site-b": ["--labels", "box", "--boxes-from-masks"], "site-c": ["--labels", "image", "--image-labels-from-masks"]}


@pytest.fixture(scope="session")
def mixed_federation(tmp_path_factory: pytest.TempPathFactory):
    """Pixel, box and image-level sites, each served by a real node process."""
    yield from _serve(tmp_path_factory.mktemp("mixed"), 1, MIXED_LABELS)
