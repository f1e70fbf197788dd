"""Parity with the real open-clip-torch 3.3.0: imported weights give the same image and
text embeddings (relative L2 error < 1e-5 in float32) and the same logit scale, on
both kernel paths (`model.kernels=cpu` and `xla`).

Models are random-init open_clip models at tiny sizes, their params perturbed so no
bias or zero-init BatchNorm hides a mapping error, BN running statistics randomised.
The OpenAI layout is open_clip's `CLIP.state_dict()`; files go through the CLI.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipjax import checkpoint
from clipjax.cli import main
from clipjax.interop import peer
from clipjax.interop.state_dict import from_state_dict, to_state_dict
from clipjax.models import build_model, presets

torch = pytest.importorskip("torch")
TOL = 1e-5

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}
# ViT, GELU, odd head width and MLP ratios (int() truncation of 64 * 2.7 = 172.8), the
# image embedding the mean of the patch tokens (pool_type avg).
VIT_GELU = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2,
                           "head_width": 16, "mlp_ratio": 2.7, "pool_type": "avg"},
            "text_cfg": {**TEXT, "mlp_ratio": 3.3}}
# ViT, QuickGELU, 64-wide heads as OpenAI's layout implies (its importer infers them).
VIT_QUICK = {"embed_dim": 48, "quick_gelu": True,
             "vision_cfg": {"image_size": 48, "patch_size": 16, "width": 128, "layers": 3},
             "text_cfg": {**TEXT, "width": 128, "heads": 2, "layers": 2}}
# ModifiedResNet with RN50's block layout at width 8 (features 8 .. 256, 4 pool heads).
RESNET = {"embed_dim": 32, "quick_gelu": True,
          "vision_cfg": {"image_size": 64, "layers": [3, 4, 6, 3], "width": 8},
          "text_cfg": {**TEXT, "width": 64, "heads": 1, "layers": 2}}


def _open_clip_model(data, seed=0):
    oc = peer.open_clip()
    torch.manual_seed(seed)
    model = oc.CLIP(data["embed_dim"], data["vision_cfg"], data["text_cfg"],
                    quick_gelu=data.get("quick_gelu", False),
                    init_logit_bias=data.get("init_logit_bias"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.logit_scale.fill_(3.9)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    return model.eval()


def _inputs(size, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, size, size, generator=g)
    tokens = torch.randint(1, 49406, (3, 77), generator=g)
    tokens[:, 0] = 49406
    for row, end in enumerate((4, 30, 76)):
        tokens[row, end] = 49407
        tokens[row, end + 1:] = 0
    return images, tokens


def _reference(model, images, tokens):
    with torch.no_grad():
        return (model.encode_image(images, normalize=True).numpy(),
                model.encode_text(tokens, normalize=True).numpy())


def _ours(model_cfg, params, images, tokens):
    model = build_model(model_cfg)
    fn = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t))
    out = fn(params, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)),
             jnp.asarray(tokens.numpy(), jnp.int32))
    return np.asarray(out["image_emb"]), np.asarray(out["text_emb"]), out["logit_scale"]


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _assert_parity(model, model_cfg, params, size):
    """Both kernel paths (`model.kernels`: CPU-tuned and XLA's) give open_clip's numbers."""
    images, tokens = _inputs(size)
    ref_img, ref_txt = _reference(model, images, tokens)
    for kernels in ("cpu", "xla"):
        cfg = model_cfg.copy_and_resolve_references()
        cfg.kernels = kernels
        img, txt, scale = _ours(cfg, params, images, tokens)
        assert _rel(img, ref_img) < TOL, (kernels, _rel(img, ref_img))
        assert _rel(txt, ref_txt) < TOL, (kernels, _rel(txt, ref_txt))
        assert float(scale) == pytest.approx(model.logit_scale.item(), abs=1e-7)


def _import_cli(tmp_path, argv):
    workdir = tmp_path / "imported"
    assert main(["import", *argv, "--workdir", str(workdir)]) == 0
    config = checkpoint.read_config(str(workdir))
    _, step = checkpoint.resolve(str(workdir))
    return config.model, checkpoint.restore_params(str(workdir), step)


def test_vit_gelu_safetensors_via_open_clip_cli(tmp_path):
    from safetensors.numpy import save_file

    model = _open_clip_model(VIT_GELU)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(path))
    config_file = tmp_path / "vit.json"
    config_file.write_text(json.dumps(VIT_GELU))
    model_cfg, params = _import_cli(tmp_path, [
        "open_clip", "--checkpoint", str(path), "--model-config", str(config_file)])
    assert model_cfg.act == "gelu" and model_cfg.image.heads == 4
    assert model_cfg.image.pool == "avg" and model.visual.pool_type == "avg"
    _assert_parity(model, model_cfg, params, 32)


def test_vit_quickgelu_openai_layout_via_cli_scanned(tmp_path):
    """OpenAI's layout from torch.save; architecture inferred; stored for nn.scan."""
    model = _open_clip_model(VIT_QUICK)
    path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), path)
    model_cfg, params = _import_cli(tmp_path, [
        "openai", "--checkpoint", str(path), "--scan-layers"])
    expected = presets.from_open_clip_json(VIT_QUICK)
    expected.scan_layers = True
    assert model_cfg.to_dict() == expected.to_dict()
    assert params["image"]["transformer"]["blocks"]["ln_1"]["scale"].shape == (3, 128)
    _assert_parity(model, model_cfg, params, 48)


def test_resnet_openai_layout_via_cli(tmp_path):
    model = _open_clip_model(RESNET)
    path = tmp_path / "rn.pt"
    torch.save(model.state_dict(), path)
    model_cfg, params = _import_cli(tmp_path, ["openai", "--checkpoint", str(path)])
    assert model_cfg.image.kind == "resnet"
    assert tuple(model_cfg.image.resnet_layers) == (3, 4, 6, 3)
    assert model_cfg.image.resnet_heads == 4 and model_cfg.act == "quick_gelu"
    _assert_parity(model, model_cfg, params, 64)


def test_export_round_trip_and_custom_text_layout():
    """clipjax params -> state_dict reproduces open_clip's exactly and loads strictly;
    open_clip's custom-text layout (`text.` prefix) and logit_bias import too."""
    oc = peer.open_clip()
    for data in (RESNET, {**VIT_GELU, "init_logit_bias": -6.0}):
        model = _open_clip_model(data, seed=1)
        theirs = {k: v.numpy() for k, v in model.state_dict().items()}
        model_cfg = presets.from_open_clip_json(data)
        params = from_state_dict(theirs, model_cfg)
        back = to_state_dict(params, model_cfg)
        assert set(back) == set(theirs)
        for key, value in theirs.items():
            np.testing.assert_array_equal(back[key], value, err_msg=key)
        fresh = _open_clip_model(data, seed=2)
        fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
        custom = oc.model.convert_to_custom_text_state_dict(dict(theirs))
        assert any(k.startswith("text.") for k in custom)
        again = from_state_dict(custom, model_cfg)
        assert jax.tree.all(jax.tree.map(np.array_equal, again, params))
    assert float(params["logit_bias"]) == pytest.approx(model.logit_bias.item())
