"""Export to open_clip: create_model(pretrained=FILE) reproduces clipjax's embeddings,
and open_clip → import → export → import is exact."""

import json
import os

import numpy as np
import pytest
from apps_data import PHOTOS, photo

from clipjax import checkpoint, models
from clipjax.cli import main
from clipjax.config import default_config
from clipjax.errors import ClipjaxError
from clipjax.interop import export, peer
from clipjax.models import presets

# Tiny open_clip architectures, registered with open_clip under these names.
ARCHS = {
    "clipjax-test-vit": {**presets.open_clip_json("tiny-vit"), "quick_gelu": True},
    "clipjax-test-rn": presets.open_clip_json("tiny-rn"),
}


def _open_clip_model(oc, name: str, tmp_path, seed: int):
    import torch

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(ARCHS[name]))
    oc.add_model_config(str(path))
    torch.manual_seed(seed)
    model = oc.create_model(name, pretrained=None)
    if ARCHS[name]["vision_cfg"]["patch_size"] is None:  # give BatchNorm non-trivial stats
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval(), path


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("name", list(ARCHS))
def test_open_clip_round_trip(name, tmp_path, capsys):
    import torch
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    import clipjax
    from clipjax.interop.open_clip import import_open_clip

    oc = peer.open_clip()
    original, config_path = _open_clip_model(oc, name, tmp_path, seed=0)
    source = str(tmp_path / "original.safetensors")
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, source)

    # open_clip -> clipjax (the models engineer's import), saved as a workdir.
    params, config = import_open_clip(source, str(config_path))
    workdir = str(tmp_path / "workdir")
    checkpoint.save_params(workdir, params, config)

    # clipjax -> open_clip through the CLI.
    out = str(tmp_path / "exported.safetensors")
    name_out = f"{name}-exported"
    config_out = str(tmp_path / f"{name_out}.json")
    code = main(["export", "open_clip", "--workdir", workdir, "--out", out,
                 "--model-config-out", config_out])
    assert code == 0, capsys.readouterr().err
    assert name_out in capsys.readouterr().out
    assert presets.from_open_clip_json(json.loads(open(config_out).read())).to_dict() == \
        config.model.to_dict()

    oc.add_model_config(config_out)
    reloaded = oc.create_model(name_out, pretrained=out).eval()  # strict load

    # Same embeddings as clipjax, on real photos and real text.
    model = clipjax.load(workdir)
    images = [photo(n) for n in PHOTOS[:4]]
    texts = ["a photo of a cat", "a rocket on the launch pad", "coffee", ""]
    pixels = np.stack([model.preprocess(im) for im in images])
    tokens = model.tokenizer(texts)
    with torch.no_grad():
        torch_img = reloaded.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                          normalize=True).numpy()
        torch_txt = reloaded.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()
        original_img = original.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2),
                                             normalize=True).numpy()
    errors = (_rel_err(model.encode_images(pixels), torch_img),
              _rel_err(model.encode_texts(tokens), torch_txt))
    print("relative error image, text:", errors)
    assert max(errors) < 1e-5
    np.testing.assert_array_equal(original_img, torch_img)  # same weights, same torch model
    assert float(reloaded.logit_scale.detach()) == model.logit_scale

    # The exported file holds exactly open_clip's tensors, and re-import is bit-exact.
    exported = load_file(out)
    reference = {k: v.numpy() for k, v in original.state_dict().items()}
    assert sorted(exported) == sorted(reference)
    for key, value in reference.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    again, _ = import_open_clip(out, config_out)
    for a, b in zip(_leaves(params), _leaves(again), strict=True):
        np.testing.assert_array_equal(a, b)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_local_dir_export_carries_preprocessing(tmp_path):
    import jax

    oc = peer.open_clip()
    config = default_config()
    config.model = presets.model_config("tiny-vit")
    config.model.image.mean = (0.5, 0.5, 0.5)
    config.model.image.std = (0.25, 0.25, 0.25)
    params = models.init_params(config.model, jax.random.key(0))
    out = tmp_path / "local"
    result = export.write_open_clip(params, config.model, str(out))
    assert os.path.basename(result.weights) == export.LOCAL_DIR_WEIGHTS
    model, _, preprocess = oc.create_model_and_transforms(f"local-dir:{out}")
    norm = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert list(norm.mean) == [0.5] * 3 and list(norm.std) == [0.25] * 3
    assert model.visual.image_size == (32, 32)
    # A plain file export names what open_clip cannot record.
    plain = export.write_open_clip(params, config.model, str(tmp_path / "w.safetensors"))
    assert any("image_mean" in n for n in plain.notes)
    with pytest.raises(ClipjaxError, match=r"\.json"):
        export.write_open_clip(params, config.model, str(tmp_path / "x.safetensors"),
                               model_config_out=str(tmp_path / "x.yaml"))


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", "ViT-H-14", "RN50x4", "ViT-bigG-14",
                                  "tiny-rn", "small-vit"])
def test_model_config_maps_back(name):
    m = presets.model_config(name)
    assert presets.from_open_clip_json(export.open_clip_model_config(m)).to_dict() == m.to_dict()
    if m.image.kind == "vit":  # the mean-pooled variant records pool_type, and only it
        m.image.pool = "avg"
        data = export.open_clip_model_config(m)
        assert data["vision_cfg"]["pool_type"] == "avg"
        assert presets.from_open_clip_json(data).to_dict() == m.to_dict()


def test_export_of_missing_workdir_is_a_clear_error(tmp_path, capsys):
    code = main(["export", "open_clip", "--workdir", str(tmp_path), "--out",
                 str(tmp_path / "x.safetensors")])
    assert code == 1 and "no finalized checkpoint" in capsys.readouterr().err
