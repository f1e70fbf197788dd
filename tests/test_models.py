"""Model structure: presets against open_clip's own configs and parameter shapes (by
eval_shape, no real init of big models), scan/unrolled equivalence, logical axes,
sharded execution on the emulated mesh, dtypes, and the analytic FLOP counts."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding

from clipjax import sharding
from clipjax.config import default_config, validate
from clipjax.errors import ClipjaxError
from clipjax.interop import peer
from clipjax.interop.state_dict import rules
from clipjax.models import (
    abstract_params,
    build_model,
    flops,
    init_params,
    is_scanned,
    logical_axes,
    presets,
    stack_layers,
    unstack_layers,
)

BIG = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14",
       "ViT-L-14-336", "ViT-H-14")
# Parameter counts of OpenAI's CLIP models; clipjax's ResNet also keeps BatchNorm's
# running statistics (53,248 values in RN50) among its params.
PARAMS = {"ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737, "ViT-L-14": 427_616_513,
          "RN50": 102_007_137 + 53_248}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(tree)))


def _open_clip_dir() -> pathlib.Path:
    return pathlib.Path(peer.open_clip().__file__).parent / "model_configs"


@pytest.mark.parametrize("name", [n for n in presets.names() if not n.startswith(("tiny",
                                                                                   "small"))])
def test_preset_equals_open_clip_json(name):
    data = json.loads((_open_clip_dir() / f"{name}.json").read_text())
    assert presets.model_config(name).to_dict() == presets.from_open_clip_json(data).to_dict()


def test_every_preset_validates():
    for name in presets.names():
        config = default_config()
        config.model = presets.model_config(name)
        validate(config)


def test_unknown_preset_lists_known_names():
    with pytest.raises(ClipjaxError, match="unknown model preset 'ViT-Q-99'.*ViT-B-32.*RN50"):
        presets.model_config("ViT-Q-99")


def test_unsupported_open_clip_feature_is_named():
    data = json.loads((_open_clip_dir() / "ViT-M-16-alt.json").read_text())
    with pytest.raises(ClipjaxError, match="ls_init_value"):
        presets.from_open_clip_json(data)
    data = json.loads((_open_clip_dir() / "convnext_base.json").read_text())
    with pytest.raises(ClipjaxError, match="timm_model_name"):
        presets.from_open_clip_json(data)


@pytest.mark.parametrize("name", BIG)
def test_preset_shapes_match_open_clip(name):
    """Every tensor of open_clip's model (built on the meta device) has a clipjax param of
    the matching shape, through the import mapping; nothing is left over either way."""
    torch = pytest.importorskip("torch")
    oc = peer.open_clip()
    data = presets.open_clip_json(name)
    cfg = presets.model_config(name)
    cfg.scan_layers = False
    with torch.device("meta"):
        model = oc.CLIP(data["embed_dim"], data["vision_cfg"], data["text_cfg"],
                        quick_gelu=data.get("quick_gelu", False))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not k.endswith("num_batches_tracked")}
    abstract = nn.meta.unbox(abstract_params(cfg))
    ours = {}
    for rule in rules(cfg):
        leaf = abstract
        for part in rule.path:
            leaf = leaf[part]
        shapes = jax.eval_shape(rule.to_torch, jax.ShapeDtypeStruct(leaf.shape, jnp.float32))
        ours.update({k: tuple(s.shape) for k, s in zip(rule.keys, shapes)})
    assert ours == theirs
    if name in PARAMS:
        assert _count(abstract) == PARAMS[name]


@pytest.mark.parametrize("name", ["RN50", "ViT-B-32", "ViT-L-14-336", "ViT-H-14"])
def test_preset_output_shapes(name):
    cfg = presets.model_config(name)
    cfg.scan_layers = cfg.image.kind == "vit"  # scanned: traces in a fraction of the time
    model = build_model(cfg)
    params = nn.meta.unbox(abstract_params(cfg))
    size = cfg.image.image_size
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((2, 77), jnp.int32)
    out = jax.eval_shape(lambda p, i, t: model.apply({"params": p}, i, t), params, images, tokens)
    assert out["image_emb"].shape == out["text_emb"].shape == (2, cfg.embed_dim)
    assert out["logit_scale"].shape == () and out["logit_bias"] is None


@pytest.fixture(scope="module")
def tiny():
    cfg = presets.model_config("tiny-vit")
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(1, 49406, size=(4, 77)).astype(np.int32)
    tokens[:, 7] = 49407
    return cfg, params, images, tokens


def _encode(cfg, params, images, tokens):
    model = build_model(cfg)
    fn = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t))
    return fn(params, images, tokens)


def test_init_matches_abstract_and_logit_scale(tiny):
    cfg, params, _, _ = tiny
    abstract = nn.meta.unbox(abstract_params(cfg))
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert set(params) == {"image", "text", "logit_scale"}
    np.testing.assert_allclose(params["logit_scale"], np.log(1 / 0.07), rtol=1e-6)


def test_outputs_are_normalised(tiny):
    cfg, params, images, tokens = tiny
    out = _encode(cfg, params, images, tokens)
    for key in ("image_emb", "text_emb"):
        assert out[key].dtype == jnp.float32 and out[key].shape == (4, 32)
        np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)


def test_scan_and_remat_match_unrolled(tiny):
    cfg, params, images, tokens = tiny
    ref = _encode(cfg, params, images, tokens)
    stacked = stack_layers(params)
    assert is_scanned(stacked) and not is_scanned(params)
    assert stacked["image"]["transformer"]["blocks"]["ln_1"]["scale"].shape == (2, 64)
    scan_cfg = presets.model_config("tiny-vit")
    scan_cfg.scan_layers, scan_cfg.remat = True, "dots"
    assert jax.tree.structure(nn.meta.unbox(abstract_params(scan_cfg))) == \
        jax.tree.structure(stacked)
    out = _encode(scan_cfg, stacked, images, tokens)
    for key in ("image_emb", "text_emb"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6)
    back = unstack_layers(stacked)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, params))


def test_every_param_has_logical_axes():
    for name in ("tiny-vit", "tiny-rn"):
        for scan in (False, True):
            cfg = presets.model_config(name)
            cfg.scan_layers = scan
            abstract = nn.meta.unbox(abstract_params(cfg))
            specs = logical_axes(cfg)
            for leaf, spec in zip(jax.tree.leaves(abstract), jax.tree.leaves(
                    specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
                assert len(spec) == leaf.ndim
            if scan and name == "tiny-vit":
                spec = specs["text"]["transformer"]["blocks"]["attn"]["qkv_kernel"]
                assert tuple(spec) == ("layers", "embed", None, "heads", "kv")


def test_sharded_apply_on_mesh_matches(tiny):
    """fsdp + tensor parallel on the 8-device CPU mesh: params sharded by the logical
    rules, activations constrained; same numbers as the single-device run."""
    cfg, params, images, tokens = tiny
    ref = _encode(cfg, params, images, tokens)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"),
                         axis_types=(AxisType.Auto,) * 3)
    rules_ = sharding.rules(default_config())  # the defaults, for a mesh of one slice
    specs = nn.logical_to_mesh_sharding(logical_axes(cfg), mesh, rules_)
    sharded = jax.device_put(params, specs)
    qkv = sharded["image"]["transformer"]["blocks_0"]["attn"]["qkv_kernel"]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "model", None)
    model = build_model(cfg)
    batch = NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_):
        fn = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t))
        out = fn(sharded, jax.device_put(images, batch), jax.device_put(tokens, batch))
    for key in ("image_emb", "text_emb"):
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_and_per_tower_dtype(tiny):
    cfg, params, images, tokens = tiny
    ref = _encode(cfg, params, images, tokens)
    bf = presets.model_config("tiny-vit")
    bf.dtype, bf.text.dtype = "bfloat16", "float32"
    out = _encode(bf, params, images, tokens)
    assert out["image_emb"].dtype == jnp.float32
    np.testing.assert_allclose(out["image_emb"], ref["image_emb"], atol=3e-2)
    np.testing.assert_allclose(out["text_emb"], ref["text_emb"], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(out["image_emb"], ref["image_emb"])


def test_logit_bias_and_init_values():
    cfg = presets.model_config("tiny-vit")
    cfg.use_logit_bias, cfg.logit_bias_init, cfg.logit_scale_init = True, -7.5, 2.0
    abstract = nn.meta.unbox(abstract_params(cfg))
    assert abstract["logit_bias"].shape == ()
    params = init_params(cfg, jax.random.key(1))
    assert float(params["logit_bias"]) == -7.5 and float(params["logit_scale"]) == 2.0
    model = build_model(cfg)
    scale, bias = model.apply({"params": params}, method=lambda m: (m.logit_scale, m.logit_bias))
    assert float(bias) == -7.5 and float(scale) == 2.0


def test_wrong_input_shapes_are_errors(tiny):
    cfg, params, _, _ = tiny
    model = build_model(cfg)
    with pytest.raises(ClipjaxError, match="longer than the context length 77"):
        model.apply({"params": params}, jnp.zeros((1, 80), jnp.int32), method="encode_text")
    with pytest.raises(ClipjaxError, match=r"the model takes \[N, 32, 32, 3\]"):
        model.apply({"params": params}, jnp.zeros((1, 3, 32, 32)), method="encode_image")


def _xla_flops(cfg, method, shape, dtype):
    model = build_model(cfg)
    params = nn.meta.unbox(abstract_params(cfg))
    fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
    return fn.lower(params, jax.ShapeDtypeStruct(shape, dtype)).compile().cost_analysis()["flops"]


def test_flops_agree_with_xla_cost_analysis():
    """Matmul FLOPs are most of what XLA counts (it adds the element-wise work)."""
    cfg = presets.from_open_clip_json(
        presets._vit(64, 64, 2, 128, 8, presets._text(128, 4, 2)))
    image = _xla_flops(cfg, "encode_image", (1, 64, 64, 3), jnp.float32)
    text = _xla_flops(cfg, "encode_text", (1, 77), jnp.int32)
    assert 0.85 < flops.image_flops(cfg) / image < 1.0
    assert 0.85 < flops.text_flops(cfg) / text < 1.0
    f = flops.forward_flops(cfg)
    assert f["total"] == f["image"] + f["text"]
    assert flops.forward_flops_per_sample(cfg) == f["total"]
    assert flops.train_flops_per_sample(cfg) == 3 * f["total"]


def test_flops_of_known_architectures():
    # open_clip's model profile (fvcore, multiply-adds): ViT-B-32 image 4.41 G, text 2.96 G;
    # ViT-L-14 image 81.08 G. FLOPs are twice that.
    # Unrolled, clipjax runs only the pooled token through the last block: 1/12 less work.
    b32 = presets.model_config("ViT-B-32")
    full_image = flops.image_flops(b32, pooled_last=False)
    full_text = flops.text_flops(b32, pooled_last=False)
    assert 0.9 * full_image < flops.image_flops(b32) < 0.95 * full_image
    assert 0.9 * full_text < flops.text_flops(b32) < 0.95 * full_text
    pooled_image = flops.image_flops(b32)
    b32.scan_layers = True  # scanned: L-1 layers in the scan, then the pooled last block
    assert flops.image_flops(b32) == pooled_image
    b32.image.pool = "avg"  # the patch mean needs every token out of the last block
    assert flops.image_flops(b32) == full_image
    assert 2 * 4.38e9 < full_image < 2 * 4.44e9
    assert 2 * 2.94e9 < full_text < 2 * 3.0e9
    l14 = presets.model_config("ViT-L-14")
    assert 2 * 80.9e9 < flops.image_flops(l14, pooled_last=False) < 2 * 81.2e9
    # RN50 at 224: XLA's cost analysis of the compiled tower says 11.2 GFLOPs (it skips the
    # zero padding taps, element-wise work included); the analytic count is 11.6.
    assert 11.0e9 < flops.image_flops(presets.model_config("RN50")) < 12.0e9


def test_resnet_remat_gradients_and_frozen_batch_norm_statistics():
    rng = np.random.default_rng(0)
    abstract = nn.meta.unbox(abstract_params(presets.model_config("tiny-rn")))
    params = jax.tree.map(lambda s: np.abs(rng.normal(size=s.shape)).astype(np.float32) * 0.2
                          + 0.1, abstract)  # positive: valid BN variances
    images = jnp.asarray(rng.normal(size=(2, 64, 64, 3)), jnp.float32)

    def grads(remat):
        c = presets.model_config("tiny-rn")
        c.remat = remat
        model = build_model(c)
        loss = lambda p: jnp.sum(model.apply({"params": p}, images, method="encode_image")[:, 0])
        return jax.jit(jax.grad(loss))(params)

    plain, rematted = grads("none"), grads("full")
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    bn = plain["image"]["layer1_0"]["bn1"]
    assert not np.any(bn["mean"]) and not np.any(bn["var"])  # statistics stay fixed
    assert np.any(bn["scale"]) and np.any(plain["image"]["conv1"]["kernel"])


@pytest.mark.parametrize("causal", [False, True])
def test_last_block_of_pooled_tokens_equals_the_full_stack(causal):
    """Running only the pooled token through the last block changes nothing downstream:
    outputs and gradients equal those of the full stack followed by the gather."""
    from clipjax.models.layers import Transformer, take_tokens

    stack = Transformer(32, 2, 4, causal=causal)
    x = jax.random.normal(jax.random.key(0), (3, 7, 32))
    index = jnp.array([0, 6, 3])
    params = stack.init(jax.random.key(1), x)

    def pooled(p, x):
        return stack.apply(p, x, index)

    def full(p, x):
        return take_tokens(stack.apply(p, x), index)

    np.testing.assert_allclose(pooled(params, x), full(params, x), rtol=1e-5, atol=1e-6)
    assert pooled(params, x).shape == (3, 1, 32)
    g_pooled = jax.grad(lambda p, x: jnp.sum(pooled(p, x) ** 2), argnums=(0, 1))(params, x)
    g_full = jax.grad(lambda p, x: jnp.sum(full(p, x) ** 2), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(g_pooled), jax.tree.leaves(g_full)):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), np.abs(a - b).max()


def test_kernels_auto_resolves_for_the_compile_target():
    from clipjax.models import resolve_kernels, target_platform

    assert resolve_kernels("auto") == "cpu"  # these tests run on CPU
    for platform, want in (("tpu", "xla"), ("gpu", "xla"), ("cuda", "xla"), ("cpu", "cpu")):
        with target_platform(platform):
            assert resolve_kernels("auto") == want
            assert resolve_kernels("cpu") == "cpu" and resolve_kernels("xla") == "xla"
    with target_platform("tpu"):
        cfg = presets.model_config("tiny-vit")
        assert build_model(cfg).image.kernels == "xla"
    assert build_model(presets.model_config("tiny-vit")).text.kernels == "cpu"
    with pytest.raises(ClipjaxError, match="model.kernels"):
        resolve_kernels("cudnn")


@pytest.mark.parametrize("scan", [False, True])
def test_kernel_paths_give_equal_outputs_and_gradients(tiny, scan):
    """`model.kernels=cpu` (custom-VJP projections, head-major attention) and `xla`
    (autodiff, jax.nn.dot_product_attention): same embeddings and gradients."""
    cfg, params, images, tokens = tiny
    if scan:
        params = stack_layers(params)
    weights = jnp.arange(4.0)

    def run(kernels):
        c = presets.model_config("tiny-vit")
        c.kernels, c.scan_layers, c.remat = kernels, scan, "dots" if scan else "none"
        model = build_model(c)

        def loss(p):
            out = model.apply({"params": p}, images, tokens)
            return jnp.sum(out["image_emb"] @ out["text_emb"].T * weights), out

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss_cpu, out_cpu), g_cpu = run("cpu")
    (loss_xla, out_xla), g_xla = run("xla")
    np.testing.assert_allclose(loss_cpu, loss_xla, rtol=1e-5)
    for key in ("image_emb", "text_emb"):
        np.testing.assert_allclose(out_cpu[key], out_xla[key], rtol=1e-5, atol=1e-6)
    for path, a in jax.tree_util.tree_flatten_with_path(g_cpu)[0]:
        b = _leaf(g_xla, path)
        err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
        assert err < 1e-5, (jax.tree_util.keystr(path), err)


def _leaf(tree, path):
    for p in path:
        tree = tree[p.key]
    return tree


@pytest.mark.parametrize("causal", [False, True])
def test_scanned_stack_with_pooled_last_block_equals_the_full_scan(causal):
    """Scanned: L-1 layers in the scan over params [:L-1], the last block unrolled over
    [L-1] on the pooled tokens only; the stacked param tree is unchanged, and outputs and
    gradients equal the full scanned stack followed by the gather (`scan_pooled_last=False`,
    what the train step compiles under gradient accumulation)."""
    from clipjax.models.layers import Transformer

    stack = Transformer(32, 3, 4, causal=causal, scan=True, remat="dots")
    x = jax.random.normal(jax.random.key(0), (3, 7, 32))
    index = jnp.array([0, 6, 3])
    params = nn.meta.unbox(stack.init(jax.random.key(1), x))
    assert params["params"]["blocks"]["attn"]["qkv_kernel"].shape == (3, 32, 3, 4, 8)

    def pooled(p, x):
        return stack.apply(p, x, index)

    def full(p, x):
        return stack.clone(scan_pooled_last=False).apply(p, x, index)

    assert pooled(params, x).shape == full(params, x).shape == (3, 1, 32)
    np.testing.assert_allclose(pooled(params, x), full(params, x), rtol=1e-5, atol=1e-6)
    grad = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(f(p, x) ** 2), argnums=(0, 1)))
    g_pooled, g_full = grad(pooled)(params, x), grad(full)(params, x)
    for a, b in zip(jax.tree.leaves(g_pooled), jax.tree.leaves(g_full)):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), np.abs(a - b).max()


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policy_saves_the_same_dots_on_both_kernel_paths(scan):
    """`model.remat=dots_no_batch` keeps the projections' outputs whichever kernels compute
    them (the CPU path's custom VJP shows its dot to the policy), and the scanned stack
    keeps no per-layer copy of its params for the backward pass."""
    import contextlib
    import io
    import re

    from jax.ad_checkpoint import print_saved_residuals

    from clipjax.models.layers import Transformer

    def saved_residuals(f, *args):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(f, *args)
        rows = re.findall(r"^(\w+)\[([\d,]*)\] (.*)$", out.getvalue(), re.M)
        names = {"bf16": jnp.bfloat16, "f32": jnp.float32, "i32": jnp.int32}
        return [(tuple(int(n) for n in dims.split(",") if n), names.get(dt, dt), why)
                for dt, dims, why in rows]

    x = jnp.ones((4, 9, 64))
    index = jnp.zeros(4, jnp.int32)
    saved = {}
    for kernels in ("cpu", "xla"):
        stack = Transformer(64, 3, 2, scan=scan, remat="dots_no_batch", kernels=kernels,
                            dtype=jnp.bfloat16)
        params = nn.meta.unbox(stack.init(jax.random.key(0), x))
        res = saved_residuals(lambda p, x, m=stack: m.apply(p, x, index).sum(), params, x)
        kept = [(shape, dt) for shape, dt, why in res if "argument" not in why]
        # Only activations: bf16 projection outputs and the f32 residual stream.
        assert all(dt == jnp.bfloat16 or shape[-1] == 64 and 9 in shape or len(shape) <= 1
                   for shape, dt in kept), kept
        saved[kernels] = sum(np.prod(s) for s, dt in kept if dt == jnp.bfloat16)
    assert saved["cpu"] == saved["xla"] > 0
