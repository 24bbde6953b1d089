"""Tests for fedseg.protocol.run_store and fedseg.protocol.report on hand-made data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedseg.protocol.errors import ProtocolError
from fedseg.protocol.report import best_round, plot_dice, site_table, write_report
from fedseg.protocol.run_store import RunState, RunStore, atomic_write

STATE = RunState(run_id="abc123", round=4, plan={"rounds": 5, "model": {"width": 4}}, invites=["/x/site-a.invite"])


def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "enc.0.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "enc.0.bias": rng.standard_normal(4).astype(np.float32),
        "head.weight": rng.standard_normal((1, 4, 1, 1)).astype(np.float32),
    }


# --- RunStore ----------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    arrays = _arrays()
    store.save(STATE, arrays)
    state, loaded = RunStore(tmp_path).load()  # a fresh store, as on --resume
    assert state == STATE
    assert set(loaded) == set(arrays)
    for k in arrays:
        assert loaded[k].dtype == np.float32 and loaded[k].shape == arrays[k].shape
        np.testing.assert_array_equal(loaded[k], arrays[k])


def test_save_replaces_previous_checkpoint(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    store.save(STATE, _arrays())
    newer = RunState(run_id="abc123", round=5, plan=STATE.plan, invites=[])
    store.save(newer, {"w": np.ones(2, np.float32)})
    state, arrays = store.load()
    assert state == newer and set(arrays) == {"w"}
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_load_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    with pytest.raises(ProtocolError, match="checkpoint.npz cannot be resumed from") as info:
        store.load()
    assert str(store.checkpoint) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all", b"\x93NUMPY garbage"],
    ids=["empty", "text", "bad-npy"],
)
def test_load_garbage_checkpoint_names_the_file(tmp_path: Path, content: bytes) -> None:
    store = RunStore(tmp_path)
    store.checkpoint.write_bytes(content)
    with pytest.raises(ProtocolError, match="cannot be resumed from") as info:
        store.load()
    assert str(store.checkpoint) in str(info.value)


def test_load_checkpoint_without_state_names_the_file(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    np.savez(store.checkpoint, **_arrays())  # weights only, e.g. exported by hand
    with pytest.raises(ProtocolError, match="cannot be resumed from") as info:
        store.load()
    assert str(store.checkpoint) in str(info.value)


@pytest.mark.parametrize("state", [b"{not json", b'{"run_id": "x"}', b'["x", 1, {}, []]'], ids=["json", "fields", "list"])
def test_load_checkpoint_with_bad_state_names_the_file(tmp_path: Path, state: bytes) -> None:
    store = RunStore(tmp_path)
    np.savez(store.checkpoint, __fedseg_state__=np.frombuffer(state, dtype=np.uint8), **_arrays())
    with pytest.raises(ProtocolError, match="cannot be resumed from") as info:
        store.load()
    assert str(store.checkpoint) in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_load_truncated_checkpoint_names_the_file(tmp_path: Path, keep: float) -> None:
    store = RunStore(tmp_path)
    store.save(STATE, _arrays())
    data = store.checkpoint.read_bytes()
    store.checkpoint.write_bytes(data[: int(len(data) * keep)])  # e.g. a copy cut short
    try:
        store.load()
    except ProtocolError as exc:
        assert str(store.checkpoint) in str(exc)
    except Exception as exc:  # noqa: BLE001 - the bug under test
        raise AssertionError(f"load raised {type(exc).__name__}: {exc}, not ProtocolError") from exc
    else:
        raise AssertionError("a truncated checkpoint was loaded")


def test_metrics_round_trip_and_replace(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    assert store.read_metrics() == []
    rows = [{"round": 0, "site": "a", "val_dice": 0.5}, {"round": 1, "site": "a", "val_dice": 0.625}]
    store.write_metrics(rows)
    assert store.read_metrics() == rows
    store.write_metrics(rows[:1])  # a resume drops rows past the checkpoint
    assert store.read_metrics() == rows[:1]
    assert [json.loads(line) for line in store.metrics.read_text().splitlines()] == rows[:1]


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


# --- report --------------------------------------------------------------------------


def _row(round_: int, site: str, val: tuple[float, int], test: tuple[float, float, int]) -> dict[str, Any]:
    return {
        "round": round_,
        "site": site,
        "val_dice": val[0],
        "val_iou": val[0] / 2,
        "val_loss": 1.0,
        "val_n": val[1],
        "test_dice": test[0],
        "test_iou": test[1],
        "test_loss": 1.0,
        "test_n": test[2],
    }


# Round 1 wins on the unweighted val mean (0.5) and on test; round 2 on the
# image-weighted val mean (0.3 vs 0.18), which is the rule.
ROWS = [
    _row(0, "small", (0.0, 1), (0.0, 0.0, 1)),
    _row(0, "big", (0.0, 9), (0.0, 0.0, 3)),
    _row(1, "small", (0.9, 1), (0.99, 0.9, 1)),
    _row(1, "big", (0.1, 9), (0.95, 0.9, 3)),
    _row(2, "small", (0.3, 1), (0.2, 0.1, 1)),
    _row(2, "big", (0.3, 9), (0.4, 0.2, 3)),
]


def test_best_round_uses_image_weighted_validation_dice() -> None:
    assert best_round(ROWS) == 2
    # Row order does not matter.
    assert best_round(list(reversed(ROWS))) == 2


def test_best_round_ignores_test_dice() -> None:
    rows = [dict(r) for r in ROWS]
    for r in rows:
        if r["round"] == 0:
            r["test_dice"] = 1.0
    assert best_round(rows) == 2


def test_best_round_tie_goes_to_the_earliest_round() -> None:
    rows = [_row(r, "a", (0.5, 2), (0.1 * r, 0.0, 2)) for r in (3, 1, 2)]
    assert best_round(rows) == 1


def test_site_table_numbers() -> None:
    table = site_table(ROWS, 2)
    assert table[0] == ["site", "test n", "test Dice", "test IoU", "val Dice"]
    # Sites sorted by name, then the two means.
    assert [r[0] for r in table[1:]] == ["big", "small", "mean over sites", "mean, image-weighted"]
    assert table[1] == ["big", "3", "0.4000", "0.2000", "0.3000"]
    assert table[2] == ["small", "1", "0.2000", "0.1000", "0.3000"]
    # Unweighted: test Dice (0.4 + 0.2) / 2, IoU (0.2 + 0.1) / 2, val (0.3 + 0.3) / 2.
    assert table[3] == ["mean over sites", "4", "0.3000", "0.1500", "0.3000"]
    # Weighted by test_n for test (3, 1) and by val_n for val (9, 1):
    # test Dice (3*0.4 + 1*0.2) / 4 = 0.35, IoU (3*0.2 + 0.1) / 4 = 0.175, val 0.3.
    assert table[4] == ["mean, image-weighted", "4", "0.3500", "0.1750", "0.3000"]


def test_site_table_val_is_weighted_by_val_n() -> None:
    table = site_table(ROWS, 1)
    # val Dice: unweighted (0.9 + 0.1) / 2 = 0.5; weighted (1*0.9 + 9*0.1) / 10 = 0.18.
    assert table[3][4] == "0.5000"
    assert table[4][4] == "0.1800"
    # test Dice weighted by test_n: (1*0.99 + 3*0.95) / 4 = 0.96.
    assert table[4][2] == "0.9600"


def test_write_report_and_plot(tmp_path: Path) -> None:
    write_report(ROWS, tmp_path / "report.md", "fedseg run t (fedavg)")
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# fedseg run t (fedavg)\n")
    assert "## Best round by validation Dice: round 2" in text
    assert "## Last round: round 2" in text
    assert "| big | 3 | 0.4000 | 0.2000 | 0.3000 |" in text
    assert "| mean, image-weighted | 4 | 0.3500 | 0.1750 | 0.3000 |" in text
    plot_dice(ROWS, tmp_path / "dice.png", "t")
    assert (tmp_path / "dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_progress_without_a_terminal_prints_a_line_only_while_a_call_runs_long(monkeypatch):
    import io

    from rich.console import Console

    from fedseg.protocol import progress

    out = io.StringIO()
    reporter = progress.ConsoleReporter(3, Console(file=out, width=10_000))
    reporter.step("round 1: training on 3 nodes")
    assert out.getvalue() == ""  # the round has only begun
    monkeypatch.setattr(progress, "PLAIN_PROGRESS_S", 0.0)
    reporter.step("round 1 training: 1/3 nodes done, waiting for site-b, site-c")
    assert out.getvalue() == "  ... round 1 training: 1/3 nodes done, waiting for site-b, site-c\n"
