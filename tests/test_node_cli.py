"""``fedseg node start`` refuses bad data and bad settings with one clear line."""
from __future__ import annotations

import socket

from PIL import Image

from conftest import fedseg, shared_data
from fedseg.node.synthetic import DEFAULT_SITES, write_site


def _site(tmp_path, n=8):
    return write_site(tmp_path / "site", DEFAULT_SITES[0], n=n, size=32, seed=1)


def _start(data, tmp_path, *extra):
    return fedseg("node", "start", "--name", "x", "--data", str(data), "--workdir", str(tmp_path / "w"), "--port", "1", *extra, timeout=120)


def test_corrupt_image_is_named_and_node_does_not_start(tmp_path):
    site = _site(tmp_path)
    victim = sorted((site / "images").iterdir())[2]
    victim.write_bytes(b"\x89PNG not really")
    result = _start(site, tmp_path)
    assert result.returncode != 0 and f"images/{victim.name}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w" / "invite.json").exists()


def test_mask_of_wrong_size_is_named(tmp_path):
    site = _site(tmp_path)
    mask = sorted((site / "masks").iterdir())[1]
    Image.new("L", (16, 32)).save(mask)
    result = _start(site, tmp_path)
    assert result.returncode != 0 and f"masks/{mask.name}" in result.stderr and "Traceback" not in result.stderr


def test_missing_folder_and_empty_folder(tmp_path):
    result = _start(tmp_path / "nowhere", tmp_path)
    assert result.returncode != 0 and "nowhere" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "empty" / "images").mkdir(parents=True)
    result = _start(tmp_path / "empty", tmp_path)
    assert result.returncode != 0 and "no images" in result.stderr


def test_port_in_use_is_one_clear_line(tmp_path):
    site = _site(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = fedseg("node", "start", "--name", "x", "--data", str(site), "--workdir", str(tmp_path / "w"), "--port", str(port), timeout=120)
    assert result.returncode != 0
    assert f"port {port}" in result.stdout + result.stderr and "already in use" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def _refuses_unsplittable(result, tmp_path):
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "node x will not start" in result.stderr and "group column 'sequence' has 1 group(s)" in result.stderr
    assert not (tmp_path / "w" / "invite.json").exists()


def test_a_site_whose_splits_cannot_be_made_does_not_start(tmp_path):
    site = _site(tmp_path)
    names = sorted(p.stem for p in (site / "images").iterdir())
    (site / "meta.csv").write_text("name,sequence\n" + "".join(f"{n},1\n" for n in names))
    _refuses_unsplittable(_start(site, tmp_path), tmp_path)


def test_24_images_of_one_real_video_do_not_start(tmp_path):
    # CVC-ClinicDB's first 25 frames are one sequence: its group-aware splits need three.
    _refuses_unsplittable(_start(shared_data("polyp", "CVC-ClinicDB"), tmp_path, "--limit", "24"), tmp_path)


def test_limit_and_sample_exclude_each_other(tmp_path):
    result = _start(_site(tmp_path), tmp_path, "--limit", "4", "--sample", "4")
    assert result.returncode != 0 and "--limit" in result.stderr and "--sample" in result.stderr


def test_real_site_is_indexed_with_group_splits(tmp_path):
    from fedseg.node.datasets import describe, index_site, make_splits

    index = index_site(shared_data("polyp", "CVC-ClinicDB"), limit=None)
    info = describe(index, make_splits(index, seed=0))
    assert info["group_column"] == "sequence" and info["n_images"] == 612


def test_a_plan_with_unknown_keys_or_bad_values_is_one_clear_line(tmp_path):
    import json

    for plan, expected in (({"rounds": 3, "learning_rate": 0.1}, "unknown plan keys: ['learning_rate']"),
                           ({"train": {"lr": -1}}, "TrainConfig.lr")):
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(plan))
        result = fedseg("run", "--invite", str(tmp_path / "invite.json"), "--plan", str(path), "--out", str(tmp_path / "run"), timeout=120)
        assert result.returncode != 0 and expected in result.stderr and "Traceback" not in result.stderr
