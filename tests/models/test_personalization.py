"""Declared exchange: exactly the shared keys leave; FedRep's phases step only their own parameters."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.models.errors import ModelError
from fedseg.models.local_training import TrainConfig
from fedseg.models.personalization import LocalPart, PersonalConfig, fedrep_round, local_keys, pull, push
from fedseg.models.unet import UNetConfig, build_model

CFG = UNetConfig(width=4, depth=2, groups=2)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(CFG)


def test_pushed_keys_are_exactly_the_shared_set():
    model = _model()
    everything = set(model.state_dict())
    assert set(push(model, local_keys(model, LocalPart.NONE))) == everything
    assert push(model, local_keys(model, LocalPart.ALL)) == {}
    head = local_keys(model, LocalPart.HEAD)
    assert head == {"head.weight", "head.bias"} and set(push(model, head)) == everything - head
    norm = local_keys(model, LocalPart.NORM)
    norm_modules = {n for n, m in model.named_modules() if isinstance(m, torch.nn.GroupNorm)}
    assert norm and all(k.rsplit(".", 1)[0] in norm_modules for k in norm)
    assert not set(push(model, norm)) & norm


def test_pull_loads_shared_and_keeps_local():
    a, b = _model(0), _model(1)
    local = local_keys(a, LocalPart.HEAD)
    before_head = b.head.weight.detach().clone()
    pull(b, push(a, local), local)
    assert torch.equal(b.head.weight, before_head)
    for k, v in a.state_dict().items():
        if k not in local:
            assert torch.equal(b.state_dict()[k], v)


def test_pull_refuses_local_or_missing_keys_and_changes_nothing():
    a, b = _model(0), _model(1)
    local = local_keys(a, LocalPart.HEAD)
    leaked = push(a, frozenset())
    snapshot = {k: v.clone() for k, v in b.state_dict().items()}
    with pytest.raises(ModelError, match="unexpected \\['head.bias', 'head.weight'\\]"):
        pull(b, leaked, local)
    shared = push(a, local)
    name = sorted(shared)[0]
    shared[name] = np.zeros((1,), np.float32)
    with pytest.raises(ModelError, match=name):
        pull(b, shared, local)
    assert all(torch.equal(b.state_dict()[k], v) for k, v in snapshot.items())


def test_fedrep_phases_step_only_their_parameters():
    model = _model()
    images = torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8)
    masks = (torch.rand(8, 1, 16, 16) > 0.7).float()
    config = TrainConfig(batch_size=4, local_epochs=1.0, augment=False, weight_decay=0.0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = fedrep_round(model, config, images, masks, seed=0, head_fraction=0.5)
    assert result.steps == 2
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert {"head.weight", "head.bias"} <= changed and len(changed) > 2


def test_head_phase_alone_leaves_the_body_untouched():
    from fedseg.models.personalization import PhaseTrainer

    model = _model()
    head = local_keys(model, LocalPart.HEAD)
    images = torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8)
    masks = (torch.rand(8, 1, 16, 16) > 0.7).float()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    PhaseTrainer(model, TrainConfig(batch_size=4, augment=False), head).train_round(images, masks, seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed == set(head)


def test_personal_config_validates():
    assert PersonalConfig.from_dict({"head_fraction": 0.3}).head_fraction == 0.3
    for bad in ({"head_fraction": 1.0}, {"finetune_epochs": 0}, {"mix_epochs": -1.0}, {"oops": 1}):
        with pytest.raises(ModelError):
            PersonalConfig.from_dict(bad)
