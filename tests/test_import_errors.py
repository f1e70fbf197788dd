"""`clipjax import` on bad input: each case exits non-zero with one line naming the problem
(run in-process through `clipjax.cli.main`, plus one real subprocess)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from clipjax.cli import main
from clipjax.errors import ClipjaxError
from clipjax.interop import peer
from clipjax.interop.openai import infer_model_config
from clipjax.interop.state_dict import from_state_dict
from clipjax.models import presets

torch = pytest.importorskip("torch")

TINY_VIT = presets.open_clip_json("tiny-vit")


@pytest.fixture(scope="module")
def state_dict():
    """A tiny ViT's state_dict (open_clip = OpenAI layout), as numpy."""
    oc = peer.open_clip()
    torch.manual_seed(0)
    model = oc.CLIP(TINY_VIT["embed_dim"], TINY_VIT["vision_cfg"], TINY_VIT["text_cfg"])
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _save(path, sd):
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    return str(path)


def _run(capsys, *argv):
    code = main(["import", *argv])
    return code, capsys.readouterr().err


def test_a_good_file_imports(tmp_path, state_dict, capsys):
    ckpt = _save(tmp_path / "ok.pt", state_dict)
    code, err = _run(capsys, "open_clip", "--checkpoint", ckpt, "--model-config", "tiny-vit",
                     "--workdir", str(tmp_path / "out"))
    assert code == 0, err
    code, err = _run(capsys, "open_clip", "--checkpoint", ckpt, "--model-config", "tiny-vit",
                     "--workdir", str(tmp_path / "out"))
    assert code == 1 and "already holds a checkpoint" in err


def test_truncated_pytorch_file(tmp_path, state_dict, capsys):
    data = open(_save(tmp_path / "full.pt", state_dict), "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    code, err = _run(capsys, "openai", "--checkpoint", str(tmp_path / "cut.pt"),
                     "--workdir", str(tmp_path / "out"))
    assert code == 1
    assert "clipjax import: error:" in err and "cut.pt" in err and "truncated" in err


def test_truncated_safetensors(tmp_path, state_dict, capsys):
    from safetensors.numpy import save_file

    save_file(state_dict, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    code, err = _run(capsys, "open_clip", "--checkpoint", str(tmp_path / "cut.safetensors"),
                     "--model-config", "tiny-vit", "--workdir", str(tmp_path / "out"))
    assert code == 1 and "truncated" in err and "cut.safetensors" in err


def test_other_architecture_names_a_key(tmp_path, state_dict, capsys):
    ckpt = _save(tmp_path / "vit.pt", state_dict)
    code, err = _run(capsys, "open_clip", "--checkpoint", ckpt, "--model-config", "tiny-rn",
                     "--workdir", str(tmp_path / "out"))
    assert code == 1 and "'visual.conv1.weight'" in err and "another architecture" in err
    # Same family, other size: the first differing tensor is named with both shapes.
    code, err = _run(capsys, "open_clip", "--checkpoint", ckpt, "--model-config", "ViT-B-32",
                     "--workdir", str(tmp_path / "out"))
    assert code == 1 and "'visual.conv1.weight'" in err
    assert "(64, 3, 8, 8)" in err and "(768, 3, 32, 32)" in err


def test_missing_and_unexpected_keys(tmp_path, state_dict, capsys):
    missing = {k: v for k, v in state_dict.items() if k != "ln_final.bias"}
    ckpt = _save(tmp_path / "missing.pt", missing)
    code, err = _run(capsys, "open_clip", "--checkpoint", ckpt, "--model-config", "tiny-vit",
                     "--workdir", str(tmp_path / "out"))
    assert code == 1 and "no 'ln_final.bias'" in err
    extra = {**state_dict, "visual.extra_head.weight": np.zeros((2, 2), np.float32)}
    ckpt = _save(tmp_path / "extra.pt", extra)
    code, err = _run(capsys, "open_clip", "--checkpoint", ckpt, "--model-config", "tiny-vit",
                     "--workdir", str(tmp_path / "out"))
    assert code == 1 and "unexpected tensor 'visual.extra_head.weight'" in err


def test_unknown_preset_name(tmp_path, state_dict, capsys):
    ckpt = _save(tmp_path / "ok.pt", state_dict)
    code, err = _run(capsys, "open_clip", "--checkpoint", ckpt, "--model-config", "ViT-Z-7",
                     "--workdir", str(tmp_path / "out"))
    assert code == 1 and "unknown model preset 'ViT-Z-7'" in err and "ViT-B-32" in err


def test_open_clip_names_beyond_the_presets(tmp_path, state_dict, capsys):
    """Names clipjax has no preset for resolve through open_clip's installed configs; one
    that needs an unimplemented feature names it instead of 'unknown preset'."""
    assert "ViT-M-16-alt" not in presets.names()
    code, err = _run(capsys, "open_clip", "--checkpoint", _save(tmp_path / "ok.pt", state_dict),
                     "--model-config", "ViT-M-16-alt", "--workdir", str(tmp_path / "out"))
    assert code == 1 and "vision_cfg.ls_init_value=0.0001 is not supported" in err


def test_unsupported_model_config_json(tmp_path, state_dict, capsys):
    code, err = _run(capsys, "open_clip", "--checkpoint", _save(tmp_path / "ok.pt", state_dict),
                     "--model-config", '{"embed_dim": 32, "vision_cfg": {"timm_model_name": '
                     '"convnext_tiny"}, "text_cfg": {}}', "--workdir", str(tmp_path / "out"))
    assert code == 1 and "timm_model_name" in err


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused_with_a_way_out(tmp_path, capsys):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "jit.pt"))
    code, err = _run(capsys, "openai", "--checkpoint", str(tmp_path / "jit.pt"),
                     "--workdir", str(tmp_path / "out"))
    assert code == 1 and "TorchScript" in err and "load_openai_model" in err


def test_pickled_code_is_refused(tmp_path, capsys):
    # A pickled reference to a function: what weights_only=True exists to refuse.
    torch.save({"weights": torch.zeros(2), "callback": os.path.join}, tmp_path / "p.pt")
    code, err = _run(capsys, "openai", "--checkpoint", str(tmp_path / "p.pt"),
                     "--workdir", str(tmp_path / "out"))
    assert code == 1 and "weights_only" in err


def test_missing_file_and_not_clip(tmp_path, capsys):
    code, err = _run(capsys, "openai", "--checkpoint", str(tmp_path / "nope.pt"),
                     "--workdir", str(tmp_path / "out"))
    assert code == 1 and "does not exist" in err
    with pytest.raises(ClipjaxError, match="not an OpenAI CLIP state_dict.*text_projection"):
        infer_model_config({"visual.proj": np.zeros((4, 4)), "visual.conv1.weight":
                            np.zeros((4, 3, 2, 2)), "visual.positional_embedding":
                            np.zeros((5, 4))})


def test_wrong_scalar_and_training_checkpoint_wrapper(state_dict):
    """open_clip training checkpoints ({'state_dict': {'module.*': ...}}) import as is."""
    cfg = presets.model_config("tiny-vit")
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}
    params = from_state_dict(wrapped, cfg)
    np.testing.assert_array_equal(params["text"]["ln_final"]["bias"], state_dict["ln_final.bias"])
    bad = {**state_dict, "logit_scale": np.zeros((3,), np.float32)}
    with pytest.raises(ClipjaxError, match="'logit_scale' has shape"):
        from_state_dict(bad, cfg)


def test_subprocess_exit_status(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    proc = subprocess.run(
        [sys.executable, "-m", "clipjax", "import", "openai", "--checkpoint",
         str(tmp_path / "cut.safetensors"), "--workdir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 1, proc.stderr
    assert "clipjax import: error:" in proc.stderr and "truncated" in proc.stderr
