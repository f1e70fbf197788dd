"""Config loading, overrides and validation: bad configs fail before anything compiles."""

import pytest

from clipjax import config as config_lib
from clipjax.errors import ConfigError

TINY = "configs/tiny.py"


@pytest.fixture(autouse=True)
def _in_repo(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)


def test_tiny_loads_and_overrides_apply():
    c = config_lib.load(TINY, ["--config.train.steps=3", "--config.loss.kind=sigmoid"])
    assert c.train.steps == 3 and c.loss.kind == "sigmoid"
    assert config_lib.load(f"{TINY}:resnet").model.image.kind == "resnet"
    with pytest.raises(ConfigError, match="ResNet pools by attention"):
        config_lib.load(f"{TINY}:resnet", ["--config.model.image.pool=avg"])


@pytest.mark.parametrize("override, key", [
    ("--config.model.nope=1", "model.nope"),
    ("--config.train.steps=abc", "train.steps"),
    ("--config.loss.kind=foo", "loss.kind"),
    ("--config.model.image.patch_size=7", "model.image.patch_size"),
    ("--config.model.image.heads=3", "model.image.heads"),
    ("--config.model.text.heads=5", "model.text.heads"),
    ("--config.train.grad_accum=3", "train.grad_accum"),
    ("--config.mesh.fsdp=0", "mesh.fsdp"),
    ("--config.data.batch_size=-4", "data.batch_size"),
    ("--config.loss.chunk=4", "loss.chunk"),
    ("--config.model.kernels=cudnn", "model.kernels"),
    ("--config.model.image.pool=max", "model.image.pool"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        config_lib.load(TINY, [override])
    assert e.value.key == key
    assert key in str(e.value)


def test_unknown_key_in_a_config_object_is_rejected():
    c = config_lib.default_config()
    c.model.image.extra = 1
    with pytest.raises(ConfigError, match="unknown config key config.model.image.extra"):
        config_lib.validate(c)


def test_sharding_rule_to_unknown_mesh_axis():
    c = config_lib.default_config()
    c.sharding_rules = (("embed", "tensor"),)
    with pytest.raises(ConfigError, match="mesh axis 'tensor'"):
        config_lib.validate(c)


def test_json_round_trip_is_exact():
    c = config_lib.load(f"{TINY}:resnet", ["--config.data.augment.crop_scale=(0.5,1.0)"])
    back = config_lib.from_json(config_lib.to_json(c))
    assert back.to_dict() == c.to_dict()


def test_vit_l14_recipe_scales_with_the_batch_arg():
    c = config_lib.load("configs/clip_vit_l14.py")
    assert c.data.batch_size == 32768 and c.train.grad_accum == 2
    assert c.model.image.width == 1024 and c.model.act == "quick_gelu"
    big = config_lib.load("configs/clip_vit_l14.py:1048576")
    assert big.data.batch_size == 1048576 and big.train.grad_accum == 128
    assert big.model.remat == "dots_no_batch" and big.loss.impl == "ring"
    assert big.model.kernels == "auto" and big.model.scan_layers
