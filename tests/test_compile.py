"""`clipjax compile`: the real train step compiled for a TPU topology on this CPU machine."""

import json

import pytest

from clipjax import cli

TINY = "configs/tiny.py"


@pytest.fixture(autouse=True)
def _in_repo(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def _compile(capsys, *extra):
    rc = cli.main(["compile", "--config", TINY, "--topology", "v5e-8", "--json", *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    return rc, json.loads(captured.out.strip().splitlines()[-1])


def test_tiny_config_fits_a_v5e_8(capsys, tmp_path):
    exe = tmp_path / "step.bin"
    rc, r = _compile(capsys, f"--save={exe}")
    assert rc == 0
    assert r["topology"] == "v5e-8" and r["chips"] == 8
    assert r["mesh"] == {"data": 8, "fsdp": 1, "model": 1}
    assert r["kernels"] == "xla"  # model.kernels=auto resolves for the TPU, not this CPU
    assert r["hbm_bytes_per_chip"] == 16 << 30
    # Params + Adam moments of the tiny model are ~12 MB each; the step needs some scratch.
    assert 30e6 < r["per_chip_bytes"] < 1 << 30
    assert r["temp_bytes"] > 0 and r["fits"] is True and r["compiler_oom"] is False
    assert r["flops_per_step"] > 1e8
    assert exe.stat().st_size > 1000


def test_an_oversized_model_does_not_fit(capsys):
    # A 40M-token vocabulary: 10 GB of embedding, replicated with its Adam moments on each chip.
    rc, r = _compile(capsys, "--config.model.text.vocab_size=40000000")
    assert rc == 0
    assert r["fits"] is False and r["compiler_oom"] is True
    assert r["per_chip_bytes"] > r["hbm_bytes_per_chip"]


def test_unknown_topology_is_a_clear_error(capsys):
    assert cli.main(["compile", "--config", TINY, "--topology", "v9-8"]) == 1
    assert "unknown TPU topology 'v9-8'" in capsys.readouterr().err


def test_two_slices_of_v5e_16(capsys):
    """Multi-slice: a hybrid ICI x DCN mesh over 2 x 16 chips; batch over the slices,
    params replicated across them; the report names the collectives crossing slices."""
    rc = cli.main(["compile", "--config", TINY, "--topology", "v5e-16", "--num-slices", "2",
                   "--config.data.batch_size=64", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    r = json.loads(captured.out.strip().splitlines()[-1])
    assert r["num_slices"] == 2 and r["chips"] == 32
    assert r["mesh"] == {"slices": 2, "data": 16, "fsdp": 1, "model": 1}
    assert r["fits"] is True and 0 < r["per_chip_bytes"] < 1 << 30
    # Gradients are summed over both slices; the loss gathers embeddings across them.
    assert r["cross_slice"]["all-reduce"]["count"] > 0
    assert r["cross_slice"]["all-gather"]["count"] > 0
    assert r["cross_slice_ops"]


def test_num_slices_disagreeing_with_the_config_is_an_error(capsys):
    rc = cli.main(["compile", "--config", TINY, "--topology", "v5e-16", "--num-slices", "2",
                   "--config.mesh.slices=4"])
    assert rc == 2
    assert "mesh.slices: 4 differs from --num-slices 2" in capsys.readouterr().err
