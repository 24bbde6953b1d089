"""A node runs on the device its owner chose: names checked, resolved once, and a GPU node
trains, scores, personalizes, calibrates, adapts and predicts as a CPU node does.

The GPU tests run where PyTorch sees a CUDA GPU and skip elsewhere; the CPU path's
bit-for-bit determinism is the resume test's (``tests/test_faults.py``).
"""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedseg.models.device import check_device, resolve_device
from fedseg.models.errors import ModelError
from fedseg.node.actions import NodeRuntime
from fedseg.node.config import NodeConfig
from fedseg.node.predict import predict_folder
from fedseg.node.synthetic import write_federation
from fedseg.protocol.adapt import adapt_new_site
from fedseg.protocol.messages import Message
from fedseg.protocol.plan import Plan
from fedseg.protocol.rounds import run_federation
from fedseg.protocol.run_store import RunStore

from engine_doubles import InMemoryTransport, Reporter, TINY

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="PyTorch sees no CUDA GPU on this machine")


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names_are_accepted(name: str) -> None:
    assert check_device(name) == name


@pytest.mark.parametrize("name", ["gpu", "CUDA", "cuda:", "cuda:x", "mps", "", "cpu:0"])
def test_misspelt_device_names_are_refused_with_the_accepted_ones(name: str) -> None:
    with pytest.raises(ModelError, match=r"device must be auto\|cpu\|cuda\|cuda:N"):
        check_device(name)


def test_auto_takes_the_gpu_where_there_is_one_else_the_cpu() -> None:
    assert resolve_device("auto").type == ("cuda" if GPU else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(GPU, reason="checks the refusal on a machine without a CUDA GPU")
def test_a_gpu_is_refused_where_there_is_none(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="device 'cuda': PyTorch sees no CUDA GPU"):
        resolve_device("cuda")
    site = write_federation(tmp_path / "data", n_per_site=6, size=32, seed=0)[0]
    with pytest.raises(ModelError, match="device 'cuda:1'"):
        NodeRuntime(NodeConfig(name=site.name, data=str(site), labels="pixel", workdir=str(tmp_path / "node"), device="cuda:1"))


@needs_gpu
def test_a_gpu_beyond_the_machines_count_is_refused() -> None:
    with pytest.raises(ModelError, match=f"has {torch.cuda.device_count()} CUDA GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


class SerialTransport(InMemoryTransport):
    """Serves one request at a time across all nodes: in one process, nodes seeding their
    models from the global RNG on concurrent threads would race (real nodes are processes)."""

    lock = threading.Lock()

    def serve(self, request: Message, frame: bytes) -> bytes:
        with self.lock:
            return super().serve(request, frame)


def _nodes(sites: list[Path], root: Path, device: str, share_personalized: bool = False) -> list[NodeRuntime]:
    return [NodeRuntime(NodeConfig(name=s.name, data=str(s), labels="pixel", workdir=str(root / device / s.name),
                                   device=device, share_personalized=share_personalized)) for s in sites]


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    torch.set_num_threads(1)
    return write_federation(tmp_path_factory.mktemp("device") / "data", n_per_site=12, size=32, seed=0)


@needs_gpu
@pytest.mark.parametrize("algorithm", ["fedavg", "fedrep", "ft", "lcfed", "iopfl"])
def test_a_gpu_node_trains_and_scores_as_a_cpu_node(sites: list[Path], tmp_path: Path, algorithm: str) -> None:
    plan = Plan.from_dict({**TINY, "algorithm": algorithm})
    rows = {}
    for device in ("cpu", "cuda"):
        nodes = _nodes(sites, tmp_path, device)
        assert all(rt.device.type == device for rt in nodes)
        torch.cuda.reset_peak_memory_stats()
        rows[device] = run_federation(plan, [SerialTransport(rt) for rt in nodes], tmp_path / f"run-{device}", Reporter())
        # Training and scoring really ran on the GPU, or not at all.
        assert (torch.cuda.max_memory_allocated() > 0) == (device == "cuda")
    # Same seeds, same data: the runs differ only by floating-point noise (cuDNN, TF32).
    assert len(rows["cpu"]) == len(rows["cuda"])
    for cpu, gpu in zip(rows["cpu"], rows["cuda"]):
        assert (cpu["round"], cpu["site"]) == (gpu["round"], gpu["site"])
        for key in (k for k in cpu if k.endswith("_dice")):
            assert gpu[key] == pytest.approx(cpu[key], abs=0.05), key
    # What the coordinator keeps came back as CPU float32 arrays.
    _, arrays = RunStore(tmp_path / "run-cuda").load()
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in arrays.values())


@needs_gpu
def test_a_gpu_node_adapts_and_predicts(sites: list[Path], tmp_path: Path) -> None:
    plan = Plan.from_dict({**TINY, "algorithm": "iopfl", "model": {**TINY["model"], "norm": "batch"}})
    nodes = _nodes(sites[:2], tmp_path, "cuda", share_personalized=True)
    run_federation(plan, [SerialTransport(rt) for rt in nodes], tmp_path / "run", Reporter())
    new = NodeRuntime(NodeConfig(name="site-c", data=str(sites[2]), labels="pixel", workdir=str(tmp_path / "new"), device="cuda"))
    outcome = adapt_new_site(tmp_path / "run", SerialTransport(new), [SerialTransport(rt) for rt in nodes],
                             {"epochs": 1.0, "batch_size": 4}, Reporter())
    assert set(outcome.reply.metrics) == {"global", "norm_stats", "routed"}
    run_id = RunStore(tmp_path / "run").load()[0].run_id
    new.config.save()  # what `fedseg node start` writes, and `node predict` reads
    for which in ("routed", "global"):
        n = predict_folder(new.workdir, run_id, which, sites[2] / "images", tmp_path / which)
        assert n == len(new.index) and len(list((tmp_path / which / "masks").iterdir())) == n
    # The same saved model predicts the same masks on the CPU, up to a few boundary pixels.
    cpu = tmp_path / "cpu-node"
    cpu.mkdir()
    replace(new.config, workdir=str(cpu), device="cpu").save()
    (cpu / "models").symlink_to(new.workdir / "models")
    predict_folder(cpu, run_id, "routed", sites[2] / "images", tmp_path / "routed-cpu")
    from PIL import Image
    for mask in (tmp_path / "routed" / "masks").iterdir():
        a, b = (np.asarray(Image.open(p)) for p in (mask, tmp_path / "routed-cpu" / "masks" / mask.name))
        assert (a != b).mean() < 0.01, mask.name
