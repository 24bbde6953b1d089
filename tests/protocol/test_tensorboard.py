"""``fedseg run`` leaves TensorBoard scalars: every site's Dice, IoU, ASSD, HD95 and loss, per round."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest
from tensorboardX.proto.event_pb2 import Event

from fedseg.protocol.rounds import run_federation
from fedseg.protocol.tensorboard import TENSORBOARD_DIR

from engine_doubles import InMemoryTransport, Reporter, tiny_plan


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Tag -> step -> value, parsed from the event files' TFRecord framing as TensorBoard reads them."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i : i + 8])
            event = Event.FromString(data[i + 12 : i + 12 + length])  # after the length and its CRC
            i += 12 + length + 4  # and the data's CRC
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_every_site_metric_and_round_is_a_scalar(runtimes, tmp_path: Path, no_plots) -> None:
    rows = run_federation(tiny_plan(rounds=2), [InMemoryTransport(rt) for rt in runtimes.values()], tmp_path, Reporter())
    scalars = read_scalars(tmp_path / TENSORBOARD_DIR)
    expected = 0
    for row in rows:
        for key in [f"{split}_{m}" for split in ("val", "test") for m in ("dice", "iou", "assd", "hd95", "loss")] + ["train_loss"]:
            if key == "train_loss" and row["round"] == 0:
                continue  # round 0 only scores the initial model
            assert scalars[f"{key}/{row['site']}"][row["round"]] == pytest.approx(row[key], rel=1e-6), (key, row["site"], row["round"])
            expected += 1
    # Nothing else: no counts, no devices.
    assert sum(len(steps) for steps in scalars.values()) == expected
