"""Fixtures of the protocol tests: three in-process nodes over synthetic sites."""
from __future__ import annotations

import pytest
import torch

from engine_doubles import SITES
from fedseg.node.actions import NodeRuntime
from fedseg.node.config import NodeConfig
from fedseg.node.synthetic import write_federation


@pytest.fixture(scope="module")
def runtimes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, NodeRuntime]:
    """Three nodes over 12-image synthetic sites; loaded once, shared (they are read-only)."""
    # Real nodes are separate processes; here three train in one, and torch's intra-op
    # thread count is process-wide, so pin it for bit-identical results across runs.
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("protocol-rounds")
    sites = write_federation(root / "data", n_per_site=12, size=32, seed=0)
    out = {}
    for site in sites:
        config = NodeConfig(name=site.name, data=str(site), labels="pixel", workdir=str(root / "nodes" / site.name))
        out[site.name] = NodeRuntime(config)
    assert tuple(out) == SITES
    return out


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skips the Dice PNG (about 0.3 s a round) where a test is about the engine's logic.

    ``test_run_records_every_round_and_site`` keeps the real plot and checks it.
    """
    import fedseg.protocol.rounds as rounds

    monkeypatch.setattr(rounds, "plot_dice", lambda rows, path, title: None)
