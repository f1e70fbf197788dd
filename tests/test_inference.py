"""clipjax.load / ClipModel: batching, sharding, input kinds, workdirs, parity with open_clip."""

import importlib.util

import jax
import numpy as np
import pytest
from PIL import Image

import clipjax
from clipjax import checkpoint, models
from clipjax.errors import ClipjaxError
from clipjax.inference import ClipModel


@pytest.fixture(scope="module")
def tiny_config(repo_root):
    spec = importlib.util.spec_from_file_location("tiny", repo_root / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def random_params(model_cfg, seed=0):
    """Params of the model's exact tree and shapes, drawn in numpy.

    Cheaper than `models.init_params`, whose jitted init is the slowest thing here;
    the values only need to be fixed and non-degenerate.
    """
    from flax.linen import meta

    rng = np.random.default_rng(seed)
    abstract = meta.unbox(models.abstract_params(model_cfg))
    params = jax.tree.map(
        lambda s: rng.normal(0.0, 0.05, s.shape).astype(s.dtype), abstract)
    params["logit_scale"] = np.float32(model_cfg.logit_scale_init)
    if model_cfg.use_logit_bias:
        params["logit_bias"] = np.float32(model_cfg.logit_bias_init)
    return params


@pytest.fixture(scope="module")
def tiny(tiny_config):
    return ClipModel.from_params(tiny_config, random_params(tiny_config.model))


def _images(n, h=40, w=52, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _reference_image_emb(model, pixels):
    """Unbatched, unsharded: the module applied to the whole preprocessed input."""
    out = model.module.apply(
        {"params": model.params}, pixels, method=lambda m, x: m.encode_image(x))
    return np.asarray(out)


def test_encode_images_batches_pad_and_shard(tiny):
    assert len(tiny.devices) == 8  # conftest's emulated mesh: batches split over 8 devices
    images = _images(13)
    emb = tiny.encode_images(images, batch_size=8)
    assert emb.shape == (13, tiny.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    want = _reference_image_emb(tiny, tiny.preprocess.batch(images))
    np.testing.assert_allclose(emb, want, atol=2e-6)
    # Every input kind gives the same embeddings.
    np.testing.assert_allclose(tiny.encode_images(list(images)), emb, atol=2e-6)
    pils = [Image.fromarray(x) for x in images]
    np.testing.assert_allclose(tiny.encode_images(pils, batch_size=64), emb, atol=2e-6)
    np.testing.assert_allclose(tiny.encode_images(tiny.preprocess.batch(images)), emb, atol=2e-6)
    np.testing.assert_allclose(tiny.encode_images(pils[0]), emb[:1], atol=2e-6)
    assert tiny.encode_images([]).shape == (0, tiny.embed_dim)


def test_one_compile_per_batch_shape(tiny_config):
    config = tiny_config.copy_and_resolve_references()
    config.model.image.layers = 1  # an architecture no other test compiles
    params = random_params(config.model, 1)
    model = ClipModel.from_params(config.model, params, batch_size=16)
    for n in (13, 11, 9, 16, 40):  # all run as batches of 16
        model.encode_images(_images(n, seed=n))
    assert model._image_fn._cache_size() == 1
    model.encode_images(_images(3))  # a small input gets a small batch (8 = devices), not 16
    assert model._image_fn._cache_size() == 2
    again = ClipModel.from_params(config, params, batch_size=16)  # shares the compiles
    again.encode_images(_images(12))
    assert again._image_fn is model._image_fn and model._image_fn._cache_size() == 2


def test_single_device_equals_sharded(tiny_config, tiny):
    one = ClipModel.from_params(tiny_config, tiny.params, devices=jax.local_devices()[:1])
    images, texts = _images(5), ["a cat", "a dog on a mat", "", "x " * 100, "日本"]
    np.testing.assert_allclose(one.encode_images(images), tiny.encode_images(images), atol=2e-6)
    np.testing.assert_allclose(one.encode_texts(texts), tiny.encode_texts(texts), atol=2e-6)


def test_encode_texts_strings_and_ids(tiny):
    texts = ["a photo of a cat", "a photo of a dog", "a diagram"]
    emb = tiny.encode_texts(texts)
    assert emb.shape == (3, tiny.embed_dim)
    ids = tiny.tokenizer(texts)
    assert ids.shape == (3, tiny.context_length)
    np.testing.assert_allclose(tiny.encode_texts(ids), emb, atol=2e-6)
    np.testing.assert_allclose(tiny.encode_texts("a diagram"), emb[2:], atol=2e-6)
    want = tiny.module.apply({"params": tiny.params}, ids, method=lambda m, t: m.encode_text(t))
    np.testing.assert_allclose(emb, np.asarray(want), atol=2e-6)
    assert not np.allclose(emb[0], emb[1])


def test_properties(tiny, tiny_config):
    assert tiny.logit_scale == pytest.approx(tiny_config.model.logit_scale_init, rel=1e-6)
    assert tiny.logit_bias is None
    assert tiny.embed_dim == tiny_config.model.embed_dim
    assert tiny.preprocess.image_size == tiny_config.model.image.image_size
    assert tiny.config.model.to_dict() == tiny_config.model.to_dict()
    assert set(tiny.params) == {"image", "text", "logit_scale"}


def test_bad_inputs(tiny):
    with pytest.raises(ClipjaxError, match=r"\[N, 32, 32, 3\]"):
        tiny.encode_images(np.zeros((2, 31, 32, 3), np.float32))
    with pytest.raises(ClipjaxError, match="uint8 images must be"):
        tiny.encode_images(np.zeros((2, 31, 32), np.uint8))
    with pytest.raises(ClipjaxError, match=r"int \[N, 16\]"):
        tiny.encode_texts(np.zeros((2, 77), np.int32))
    with pytest.raises(ClipjaxError, match="strings"):
        tiny.encode_texts([1, 2])


def test_load_from_workdir_and_checkpoint(tmp_path, tiny_config, tiny):
    config = tiny_config.copy_and_resolve_references()
    config.model.use_logit_bias = True
    params = random_params(config.model, 2)
    workdir = tmp_path / "run"
    checkpoint.save_params(str(workdir), params, config, step=7)
    loaded = clipjax.load(workdir)
    assert loaded.step == 7 and loaded.logit_bias == pytest.approx(-10.0)
    direct = ClipModel.from_params(config, params)
    images, texts = _images(3), ["a cat", "a dog"]
    np.testing.assert_array_equal(loaded.encode_images(images), direct.encode_images(images))
    np.testing.assert_array_equal(loaded.encode_texts(texts), direct.encode_texts(texts))
    by_path = clipjax.load(workdir / "checkpoints" / "7", batch_size=4)
    assert by_path.step == 7 and by_path.batch_size == 4
    with pytest.raises(ClipjaxError, match="step 3"):
        clipjax.load(workdir, step=3)
    with pytest.raises(ClipjaxError, match="no finalized checkpoint"):
        clipjax.load(tmp_path / "empty")


def test_params_of_another_architecture_are_rejected(tiny_config, tiny):
    other = tiny_config.copy_and_resolve_references()
    other.model.text.width = 32
    with pytest.raises(ClipjaxError, match="text/.*shape"):
        ClipModel.from_params(other, tiny.params)
    params = dict(tiny.params)
    del params["logit_scale"]
    with pytest.raises(ClipjaxError, match="lack 'logit_scale'"):
        ClipModel.from_params(tiny_config, params)


OPEN_CLIP_CONFIG = {  # a small OpenAI-layout ViT CLIP that open_clip builds at random init
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                 "layers": 2},
}


def test_encode_matches_open_clip_preprocess_and_encode(tmp_path):
    """uint8 photos through ClipModel == open_clip's preprocess -> encode_image (1e-4 rel)."""
    import json

    import skimage.data
    import torch

    from clipjax.interop import peer
    from clipjax.interop.state_dict import from_state_dict
    from clipjax.models import presets

    open_clip = peer.open_clip()
    (tmp_path / "clipjax-test-vit.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    open_clip.add_model_config(tmp_path / "clipjax-test-vit.json")
    torch.manual_seed(0)
    reference, _, preprocess = open_clip.create_model_and_transforms(
        "clipjax-test-vit", pretrained=None)
    reference.eval()
    model_cfg = presets.from_open_clip_json(OPEN_CLIP_CONFIG)
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    model = ClipModel.from_params(model_cfg, from_state_dict(state, model_cfg))

    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
              skimage.data.camera()]  # 512², 400x600, 300x451, grayscale 512²
    texts = ["a photo of an astronaut", "a cup of coffee", "a cat", "Ünïcödé 😀 &amp; more",
             "word " * 100]
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.fromarray(p)) for p in photos])
        want_img = reference.encode_image(pixels, normalize=True).numpy()
        want_txt = reference.encode_text(open_clip.tokenize(texts), normalize=True).numpy()
    got_img = model.encode_images([Image.fromarray(p) for p in photos])
    got_arrays = model.encode_images([p for p in photos])  # uint8 arrays of varied sizes
    got_batch = model.encode_images(np.stack([skimage.data.astronaut()] * 3))  # uint8 [N,H,W,3]
    got_txt = model.encode_texts(texts)

    def rel(a, b):
        return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)

    print("max relative L2 error: images", rel(got_img, want_img).max(), "texts",
          rel(got_txt, want_txt).max())
    assert rel(got_img, want_img).max() < 1e-4
    assert rel(got_arrays, want_img).max() < 1e-4
    assert rel(got_batch, want_img[:1]).max() < 1e-4
    assert rel(got_txt, want_txt).max() < 1e-4
    assert model.logit_scale == pytest.approx(float(reference.logit_scale.detach()), rel=1e-7)
