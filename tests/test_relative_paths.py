"""Relative workdirs: `clipjax import`, `eval`, `export` and `clipjax.load` given
`--workdir runs/x` from some current directory behave exactly as with the absolute
path, and a relative path means the directory it named when the command started."""

import json
import os
import re

import numpy as np
import pytest
from eval_data import random_params, tiny_config, write_idx_split

from clipjax import checkpoint
from clipjax.cli import main
from clipjax.errors import ClipjaxError

REL = os.path.join("runs", "x")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny open_clip .safetensors and its model config (from random params)."""
    from clipjax.interop.export import write_open_clip

    d = tmp_path_factory.mktemp("weights")
    config = tiny_config()
    write_open_clip(random_params(config.model, seed=5), config.model,
                    str(d / "model.safetensors"), model_config_out=str(d / "clipjax-tiny.json"))
    return str(d / "model.safetensors"), str(d / "clipjax-tiny.json")


def _import(weights, workdir) -> int:
    model, cfg = weights
    return main(["import", "open_clip", "--model-config", cfg, "--checkpoint", model,
                 "--workdir", workdir])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, weights):
    """Two identical imported workdirs, BASE_i/runs/x, for the commands that read one."""
    bases = [tmp_path_factory.mktemp(f"base{i}") for i in range(2)]
    for b in bases:
        assert _import(weights, str(b / REL)) == 0
    return bases


def _tree(root) -> dict[str, bytes]:
    out = {}
    for r, _, files in os.walk(root):
        for f in files:
            p = os.path.join(r, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_import_relative_workdir(tmp_path, weights, monkeypatch, capsys):
    """The orbax "Checkpoint path should be absolute" failure at the first save is gone."""
    rel_base, abs_base = tmp_path / "rel", tmp_path / "abs"
    rel_base.mkdir()
    monkeypatch.chdir(rel_base)
    assert _import(weights, REL) == 0
    assert f"-> {rel_base / REL}/checkpoints/0" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert _import(weights, str(abs_base / REL)) == 0
    assert checkpoint.finalized_steps(str(rel_base / REL)) == [0]
    # The same workdir (orbax names its data files by random hashes and stamps its
    # metadata with times: compare the layout, config and params).
    rel, ab = _tree(rel_base / REL), _tree(abs_base / REL)
    assert _layout(rel) == _layout(ab)
    assert rel["config.json"] == ab["config.json"]
    a = checkpoint.restore_params(str(rel_base / REL), 0)
    b = checkpoint.restore_params(str(abs_base / REL), 0)
    for x, y in zip(*(sorted(_leaves(t)) for t in (a, b))):
        np.testing.assert_array_equal(x[1], y[1], err_msg=x[0])
    # A second import into the same relative workdir is refused, as with the absolute one.
    monkeypatch.chdir(rel_base)
    assert _import(weights, REL) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["abs", "rel"]  # nothing went to another cwd


def _layout(tree: dict) -> list[str]:
    return sorted({re.sub(r"[0-9a-f]{16,}", "H", name) for name in tree})


def _leaves(tree):
    import jax

    return [(jax.tree_util.keystr(k), np.asarray(v))
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_load_relative_workdir(runs, monkeypatch):
    import clipjax

    base = runs[0]
    absolute = clipjax.load(str(base / REL))
    monkeypatch.chdir(base)
    for path in (REL, os.path.join(REL, "checkpoints", "0"), f"./{REL}/"):
        model = clipjax.load(path)
        assert (model.workdir, model.step) == (str(base / REL), 0), path
    texts = ["a photo of a cat"]
    np.testing.assert_array_equal(model.encode_texts(texts), absolute.encode_texts(texts))
    monkeypatch.chdir(base / "runs")
    with pytest.raises(ClipjaxError, match="no finalized checkpoint"):
        clipjax.load(REL)  # runs/runs/x: relative to where we are now


def test_export_relative_workdir(runs, tmp_path, monkeypatch, capsys):
    base = runs[0]
    monkeypatch.chdir(tmp_path)
    assert main(["export", "open_clip", "--workdir", str(base / REL), "--out",
                 str(tmp_path / "abs.safetensors"), "--model-config-out",
                 str(tmp_path / "abs.json")]) == 0
    monkeypatch.chdir(base)
    assert main(["export", "open_clip", "--workdir", REL, "--out", "out/rel.safetensors",
                 "--model-config-out", "out/rel.json"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {base / 'out' / 'rel.safetensors'}" in out
    assert _safetensors(base / "out" / "rel.safetensors") == \
        _safetensors(tmp_path / "abs.safetensors")
    assert (base / "out" / "rel.json").read_text() == (tmp_path / "abs.json").read_text()
    assert main(["export", "open_clip", "--workdir", REL, "--out", "out/dir"]) == 0
    assert sorted(os.listdir(base / "out" / "dir")) == ["open_clip_config.json",
                                                        "open_clip_model.safetensors"]


def _safetensors(path) -> tuple[dict, dict]:
    """(metadata, name -> tensor bytes) of a .safetensors file (its JSON header's key
    order is not fixed)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        return f.metadata(), {k: f.get_tensor(k).tobytes() for k in f.keys()}


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    write_idx_split(str(d), "test", rng.integers(0, 255, (12, 20, 20), dtype=np.uint8),
                    rng.integers(0, 3, 12, dtype=np.uint8))
    (d / "names.txt").write_text("circle\nsquare\ntriangle\n")
    return d


def _results(workdir) -> dict:
    rec = json.loads((workdir / "eval" / "shapes" / "0.json").read_text())
    rec.pop("seconds")
    return rec


def test_eval_relative_workdir(runs, idx_dir, tmp_path, monkeypatch):
    from clipjax.evaluate import evaluator, tasks

    def argv(workdir, data, names):
        return ["eval", "--workdir", workdir, "--tasks", f"shapes=idx:{data}",
                "--classnames", names, "--batch-size", "8", "--no-progress"]

    absolute, relative = runs
    monkeypatch.chdir(tmp_path)
    assert main(argv(str(absolute / REL), str(idx_dir), str(idx_dir / "names.txt"))) == 0
    # Relative workdir, data and class names, from another current directory.
    monkeypatch.chdir(relative)
    os.symlink(idx_dir, "data")
    assert main(argv(REL, "data", "data/names.txt")) == 0
    assert _results(relative / REL) == _results(absolute / REL)
    for sub in ("eval/shapes/top1.png", "tb/eval"):
        assert (relative / REL / sub).exists(), sub
    assert sorted(os.listdir(relative)) == ["data", "runs"]  # all of it under runs/x/
    # Resolved when the evaluator starts: a later chdir does not move the run.
    ev = evaluator.Evaluator(REL, evaluator.Options(
        tasks=tasks.parse_list(f"again=idx:{idx_dir}"), classnames=str(idx_dir / "names.txt"),
        batch_size=8, progress=False), log=lambda _: None)
    monkeypatch.chdir(tmp_path)
    assert sorted(ev.run()) == [0]
    assert (relative / REL / "eval" / "again" / "0.json").exists()
    assert not (tmp_path / "runs").exists()
