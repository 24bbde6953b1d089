"""``fedseg node start --device/--amp``: a device the node cannot use is refused before it serves."""
from __future__ import annotations

import pytest
import torch

from conftest import fedseg
from fedseg.node.synthetic import DEFAULT_SITES, write_site


def _start(tmp_path, *extra):
    site = write_site(tmp_path / "site", DEFAULT_SITES[0], n=8, size=32, seed=1)
    return fedseg("node", "start", "--name", "x", "--data", str(site), "--workdir", str(tmp_path / "w"), "--port", "1", *extra, timeout=120)


def _refused(result, text: str) -> None:
    out = result.stdout + result.stderr
    assert result.returncode != 0 and text in out, out
    assert "Traceback" not in out and len(result.stderr.strip().splitlines()) == 1, out


def test_a_misspelt_device_is_refused_naming_the_accepted_ones(tmp_path):
    _refused(_start(tmp_path, "--device", "gpu"), "device must be auto|cpu|cuda|cuda:N, got 'gpu'")
    assert not (tmp_path / "w" / "invite.json").exists()


def test_mixed_precision_is_refused_on_the_cpu(tmp_path):
    _refused(_start(tmp_path, "--device", "cpu", "--amp"), "node x will not start: --amp (mixed precision) runs on a CUDA GPU only")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_a_gpu_is_refused_where_there_is_none(tmp_path):
    _refused(_start(tmp_path, "--device", "cuda:0"), "device 'cuda:0': PyTorch sees no CUDA GPU")


def test_help_shows_the_device_default():
    result = fedseg("node", "start", "--help")
    assert "--device auto|cpu|cuda|cuda:N" in result.stdout and "[default: auto]" in result.stdout
