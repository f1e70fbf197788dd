"""Inference preprocessing: the same pixels as open_clip's preprocess, on real photos."""

import numpy as np
import pytest
from PIL import Image

from clipjax import config as config_lib
from clipjax.data import preprocess
from clipjax.errors import ClipjaxError
from clipjax.interop import peer


def _photos() -> dict[str, Image.Image]:
    import skimage.data

    astronaut = Image.fromarray(skimage.data.astronaut())
    alpha = (np.add.outer(np.arange(512), np.arange(512)) % 256).astype(np.uint8)
    return {
        "astronaut": astronaut,  # 512x512 RGB
        "coffee": Image.fromarray(skimage.data.coffee()),  # 400x600: landscape
        "chelsea": Image.fromarray(skimage.data.chelsea()),  # 300x451
        "camera (L)": Image.fromarray(skimage.data.camera()),
        "RGBA": Image.fromarray(np.dstack([skimage.data.astronaut(), alpha])),
        "palette (P)": astronaut.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
        .crop((0, 0, 300, 410)),  # portrait
        "CMYK": Image.fromarray(skimage.data.coffee()).convert("CMYK"),
        "LA": Image.fromarray(skimage.data.camera()).convert("LA").crop((0, 0, 511, 97)),
        "tiny upscale": astronaut.resize((37, 61)),
    }


@pytest.fixture(scope="module")
def open_clip():
    return peer.open_clip()


def test_eval_transform_matches_open_clip_preprocess(open_clip):
    _, _, reference = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    ours = preprocess.eval_transform(config_lib.default_config().model)
    for name, image in _photos().items():
        got = ours(image)
        want = reference(image).permute(1, 2, 0).numpy()
        assert got.dtype == np.float32 and got.shape == (224, 224, 3), name
        assert np.abs(got - want).max() <= 1e-6, name


@pytest.mark.parametrize("size,interpolation", [(96, "bilinear"), (65, "bicubic")])
def test_other_sizes_means_and_resampling_match(open_clip, size, interpolation):
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    reference = open_clip.image_transform(
        size, is_train=False, mean=mean, std=std, interpolation=interpolation)
    cfg = config_lib.default_config().model
    cfg.image.image_size, cfg.image.mean, cfg.image.std = size, mean, std
    cfg.image.interpolation = interpolation
    ours = preprocess.eval_transform(cfg)
    for name, image in _photos().items():
        want = reference(image).permute(1, 2, 0).numpy()
        assert np.abs(ours(image) - want).max() <= 1e-6, name


def test_center_crop_pads_small_images_like_torchvision(open_clip):
    import torchvision.transforms.functional as F

    astronaut = _photos()["astronaut"]
    for mode in ("RGB", "L", "P"):
        image = astronaut.resize((50, 31)).convert(mode)
        got = np.asarray(preprocess.center_crop(image, 40).convert("RGB"))
        want = np.asarray(F.center_crop(image, 40).convert("RGB"))
        np.testing.assert_array_equal(got, want)


def test_uint8_arrays_paths_and_batches_agree(tmp_path):
    ours = preprocess.eval_transform(config_lib.default_config().model)
    coffee = _photos()["coffee"]
    expected = ours(coffee)
    np.testing.assert_array_equal(ours(np.asarray(coffee)), expected)
    coffee.save(tmp_path / "coffee.png")
    np.testing.assert_array_equal(ours(tmp_path / "coffee.png"), expected)
    batch = ours.batch([coffee, np.asarray(coffee), str(tmp_path / "coffee.png")])
    assert batch.shape == (3, 224, 224, 3)
    np.testing.assert_array_equal(batch, np.stack([expected] * 3))
    # A uint8 batch already at the model's size takes the no-resize fast path.
    square = np.stack([ours.pixels(coffee)] * 2)
    np.testing.assert_array_equal(ours.batch(square), np.stack([expected] * 2))


def test_normalize_is_torchvision_arithmetic():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 17, 9, 3), dtype=np.uint8)
    mean, std = config_lib.OPENAI_MEAN, config_lib.OPENAI_STD
    want = (images.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    np.testing.assert_array_equal(preprocess.normalize(images, mean, std), want)


def test_to_rgb_modes():
    gray = Image.fromarray(np.full((4, 4), 7, np.uint8))
    assert np.asarray(preprocess.to_rgb(gray)).tolist()[0][0] == [7, 7, 7]
    rgba = Image.fromarray(np.full((4, 4, 4), (10, 20, 30, 0), np.uint8))
    assert np.asarray(preprocess.to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]  # alpha dropped
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert np.asarray(preprocess.to_rgb(cmyk))[0, 0].tolist() == [255, 255, 255]


def test_bad_images_are_clear_errors(tmp_path):
    ours = preprocess.eval_transform(config_lib.default_config().model)
    with pytest.raises(ClipjaxError, match="uint8"):
        ours(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ClipjaxError, match=r"\[H, W, 3\]"):
        ours(np.zeros((8, 8, 5), np.uint8))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ClipjaxError, match="broken.jpg"):
        ours(broken)
    with pytest.raises(ClipjaxError, match="missing.png"):
        ours(tmp_path / "missing.png")
