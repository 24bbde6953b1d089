from __future__ import annotations

import pytest
import torch

from fedseg.models.errors import ModelError
from fedseg.models.unet import UNetConfig, build_model

torch.set_num_threads(1)

TINY = UNetConfig(width=4, depth=2, groups=2)


@pytest.mark.parametrize("in_channels, out_channels", [(3, 1), (1, 2)])
def test_output_shape(in_channels: int, out_channels: int) -> None:
    torch.manual_seed(0)
    cfg = UNetConfig(in_channels=in_channels, out_channels=out_channels, width=4, depth=2, groups=2)
    logits = build_model(cfg)(torch.rand(2, in_channels, 32, 32))
    assert logits.shape == (2, out_channels, 32, 32)


def test_non_square_input_and_deterministic_init() -> None:
    torch.manual_seed(1)
    a = build_model(TINY)
    torch.manual_seed(1)
    b = build_model(TINY)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a(torch.rand(1, 3, 16, 36)).shape == (1, 1, 16, 36)


def test_bad_input_size_states_rule() -> None:
    model = build_model(TINY)
    with pytest.raises(ModelError, match=r"multiples of 2\*\*depth=4.*\(1, 3, 30, 32\)"):
        model(torch.rand(1, 3, 30, 32))
    with pytest.raises(ModelError, match=r"\(B, 3, H, W\).*\(1, 1, 32, 32\)"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(ModelError, match="float"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"in_channels": 2}, "in_channels"),
        ({"out_channels": 0}, "out_channels"),
        ({"width": 1}, "width"),
        ({"width": 512}, "width"),
        ({"depth": 0}, "depth"),
        ({"depth": 7}, "depth"),
        ({"groups": 0}, "groups"),
        ({"width": 12, "groups": 8}, "groups"),
        ({"width": True}, "width"),
        ({"depth": 2.0}, "depth"),
    ],
)
def test_config_validation_names_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ModelError, match=field):
        UNetConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_keys() -> None:
    assert UNetConfig.from_dict(TINY.to_dict()) == TINY
    assert UNetConfig.from_dict({"width": 8}).width == 8
    with pytest.raises(ModelError, match=r"\['chanels', 'z'\]"):
        UNetConfig.from_dict({"width": 8, "z": 1, "chanels": 3})


def test_batchnorm_state_is_float_only_and_survives_arrays_and_averaging() -> None:
    import numpy as np

    from fedseg.models.local_training import arrays_to_state, state_to_arrays
    from fedseg.protocol.aggregate import weighted_average
    from fedseg.protocol.messages import check_arrays

    cfg = UNetConfig(width=4, depth=2, groups=2, norm="batch")
    torch.manual_seed(0)
    a, b = build_model(cfg), build_model(cfg)
    a(torch.rand(4, 3, 16, 16))  # train mode: running statistics move
    state = a.state_dict()
    assert any(k.endswith("running_var") for k in state) and not any("num_batches_tracked" in k for k in state)
    assert all(v.is_floating_point() for v in state.values())
    arrays = state_to_arrays(a)
    check_arrays(arrays, {k: tuple(v.shape) for k, v in state.items()}, "test")
    mean = weighted_average([(arrays, 1.0), (state_to_arrays(b), 3.0)])
    arrays_to_state(b, mean)
    key = "encoder.0.1.running_mean"
    np.testing.assert_allclose(b.state_dict()[key].numpy(), 0.25 * arrays[key], rtol=1e-6, atol=1e-7)  # b's own mean starts at 0
    b.eval()
    assert b(torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)
    with pytest.raises(ModelError, match="norm"):
        UNetConfig(norm="layer")
