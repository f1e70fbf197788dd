"""Contrastive losses: ring == dense (values and gradients) on meshes and one device; dense ==
open_clip's ClipLoss / SigLipLoss; caption positives == torch soft-target references; ring memory
stays flat in the global batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from clipjax import config as config_lib
from clipjax.errors import ClipjaxError, ConfigError
from clipjax.losses import caption_ids, contrastive_loss, options
from clipjax.losses.common import axes_of

RAW_SCALE = math.log(10.0) + 0.1  # below the clamp, so its gradient is live
BIAS = -2.0


def _mesh(shape, names, axis_type=AxisType.Auto):
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape),
                         devices=jax.devices()[:math.prod(shape)])


def _unit(rng, n, d):
    v = rng.standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _inputs(n, d, seed=0, repeats=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, max(n // 2, 1), n).astype(np.int32) if repeats else np.arange(n)
    return _unit(rng, n, d), _unit(rng, n, d), ids


def _loss_and_grads(x, y, ids, *, mesh=None, batch_axes=("data",), **kw):
    def f(x, y, s, b):
        return contrastive_loss(x, y, s, b, mesh=mesh, batch_axes=batch_axes, ids=ids, **kw)

    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    args = (x, y, jnp.float32(RAW_SCALE), jnp.float32(BIAS))
    if mesh is None:
        (loss, metrics), grads = grad(*args)
    else:  # as the trainer calls it: global arrays sharded over the batch axes, mesh set
        rows = NamedSharding(mesh, P(tuple(batch_axes)))
        x, y = jax.device_put(x, rows), jax.device_put(y, rows)
        ids = jax.device_put(ids, rows)
        with jax.set_mesh(mesh):
            (loss, metrics), grads = grad(x, y, *args[2:])
    return jax.device_get((loss, metrics, grads))


def _close(got, want, what, rtol=1e-5):
    """Equal within rtol relative to the largest magnitude of `want` (zero-safe)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-6)
    err = np.abs(got - want).max() / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def _assert_same(a, b, prefix):
    (la, ma, ga), (lb, mb, gb) = a, b
    _close(la, lb, f"{prefix} loss")
    for name, g1, g2 in zip(("d img", "d txt", "d scale", "d bias"), ga, gb, strict=True):
        if name == "d bias" and abs(float(g2)) < 1e-6:  # softmax: bias cancels, grad ~ 0
            assert abs(float(g1)) < 1e-6, f"{prefix} {name}: {g1}"
            continue
        _close(g1, g2, f"{prefix} {name}")
    assert ma.keys() == mb.keys()
    for k in ma:
        _close(ma[k], mb[k], f"{prefix} metric {k}")


LAYOUTS = {  # name: (mesh shape, axes, local batch b, chunk)
    "1dev_b5": (None, ("data",), 5, 0),
    "8dev_b1": ((8,), ("data",), 1, 0),
    "4x2_b3": ((4, 2), ("data", "fsdp"), 3, 0),
    "8dev_b4_chunk2": ((8,), ("data",), 4, 2),
}


@pytest.mark.parametrize("positives", ["index", "caption"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ring_equals_dense(layout, kind, positives):
    shape, batch_axes, b, chunk = LAYOUTS[layout]
    mesh = None if shape is None else _mesh(shape, batch_axes)
    n = b * (1 if shape is None else math.prod(shape))
    x, y, ids = _inputs(n, 16, seed=n)
    kw = {"kind": kind, "positives": positives}
    reference = _loss_and_grads(x, y, ids, **kw)  # dense on one device
    ring = _loss_and_grads(x, y, ids, mesh=mesh, batch_axes=batch_axes, impl="ring",
                           chunk=chunk, **kw)
    _assert_same(ring, reference, f"ring[{layout}]")
    if mesh is not None:
        dense = _loss_and_grads(x, y, ids, mesh=mesh, batch_axes=batch_axes, impl="dense", **kw)
        _assert_same(dense, reference, f"dense[{layout}]")


def test_batch_over_two_of_three_mesh_axes():
    """A (data, fsdp, model) mesh with the batch over (data, fsdp): replicated over 'model'."""
    mesh = _mesh((2, 2, 2), ("data", "fsdp", "model"))
    x, y, ids = _inputs(8, 16, seed=5)
    kw = {"kind": "sigmoid", "positives": "caption", "mesh": mesh,
          "batch_axes": ("data", "fsdp")}
    reference = _loss_and_grads(x, y, ids, kind="sigmoid", positives="caption")
    for impl in ("ring", "dense"):
        _assert_same(_loss_and_grads(x, y, ids, impl=impl, **kw), reference, impl)


def test_explicit_mesh_axes():
    """jax.make_mesh's default (Explicit axes): inputs are resharded to what shard_map needs."""
    mesh = _mesh((8,), ("data",), AxisType.Explicit)
    x, y, ids = _inputs(16, 8, seed=6)
    reference = _loss_and_grads(x, y, ids, kind="softmax", positives="caption")
    for impl in ("ring", "dense"):
        got = _loss_and_grads(x, y, ids, impl=impl, mesh=mesh, kind="softmax",
                              positives="caption")
        _assert_same(got, reference, f"{impl} explicit")


def _numpy_loss(x, y, ids, kind):
    """float64 numpy reference: uniform soft targets over same-id pairs (softmax), z = +1 on
    them (sigmoid)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    logits = np.exp(RAW_SCALE) * x @ y.T + BIAS
    pos = (ids[:, None] == ids[None, :]).astype(np.float64)
    if kind == "softmax":
        targets = pos / pos.sum(1, keepdims=True)

        def ce(z):
            z = z - z.max(1, keepdims=True)
            return -(targets * (z - np.log(np.exp(z).sum(1, keepdims=True)))).sum(1).mean()

        return (ce(logits) + ce(logits.T)) / 2, pos.sum() / len(ids)
    z = 2 * pos - 1
    return np.logaddexp(0, -z * logits).sum() / len(ids), pos.sum() / len(ids)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_label_positives_equal_numpy_and_ring_equals_dense(kind):
    """Class ids (ten classes over 32 samples): every same-class pair is a positive; the
    ring on 8 devices (tiled) equals the dense loss on one, values and gradients."""
    x, y, _ = _inputs(32, 16, seed=9)
    labels = np.random.default_rng(9).integers(0, 10, 32).astype(np.int32)
    want, positives = _numpy_loss(x, y, labels, kind)
    assert positives > 2  # the draw repeats classes
    dense = _loss_and_grads(x, y, labels, kind=kind, positives="label")
    _close(dense[0], want, f"{kind} label loss")
    _close(dense[1]["positives"], positives, f"{kind} positives")
    ring = _loss_and_grads(x, y, labels, mesh=_mesh((8,), ("data",)), impl="ring", chunk=2,
                           kind=kind, positives="label")
    _assert_same(ring, dense, "ring label")


# --------------------------------------------------------------------------- peers


@pytest.fixture(scope="module")
def torch_loss():
    from clipjax.interop import peer

    if not peer.available():
        pytest.skip("open_clip is not installed")
    open_clip = peer.open_clip()
    import open_clip.loss as oc_loss
    import torch

    def run(x, y, kind, fn=None):
        """open_clip's loss (or fn) on float64 copies: (loss, d img, d txt, d raw scale, d bias)."""
        tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        ty = torch.tensor(y, dtype=torch.float64, requires_grad=True)
        raw = torch.tensor(RAW_SCALE, dtype=torch.float64, requires_grad=True)
        bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
        if fn is not None:
            loss = fn(tx, ty, raw.exp(), bias)
        elif kind == "softmax":
            loss = oc_loss.ClipLoss()(tx, ty, raw.exp())
        else:
            loss = oc_loss.SigLipLoss()(tx, ty, raw.exp(), bias)
        loss.backward()
        grads = [tx.grad, ty.grad, raw.grad, bias.grad if bias.grad is not None else 0.0]
        return float(loss.detach()), [np.asarray(g) for g in grads]

    run.torch = torch
    assert open_clip.__version__
    return run


def _check_peer(ours, theirs, what):
    (loss, _, grads), (ref_loss, ref_grads) = ours, theirs
    _close(loss, ref_loss, f"{what} loss")
    for name, g, r in zip(("d img", "d txt", "d scale", "d bias"), grads, ref_grads, strict=True):
        if name == "d bias" and abs(float(r)) < 1e-6:
            continue
        _close(g, r, f"{what} {name}")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_dense_equals_open_clip(torch_loss, kind):
    x, y, ids = _inputs(12, 32, seed=3)
    ours = _loss_and_grads(x, y, ids, kind=kind)
    _check_peer(ours, torch_loss(x, y, kind), f"{kind} vs open_clip")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_caption_positives_equal_torch_soft_targets(torch_loss, kind):
    """Repeated captions: uniform soft targets over a row's positives (softmax, torch's own
    probability-target cross-entropy), z=+1 on every positive (sigmoid)."""
    torch = torch_loss.torch
    x, y, ids = _inputs(12, 32, seed=4)
    pos = torch.tensor(ids[:, None] == ids[None, :], dtype=torch.float64)
    assert pos.sum() > len(ids)  # the draw repeats some captions

    def reference(tx, ty, scale, bias):
        logits = scale * tx @ ty.T + bias
        if kind == "softmax":
            targets = pos / pos.sum(1, keepdim=True)
            f = torch.nn.functional.cross_entropy
            return (f(logits, targets) + f(logits.T, targets)) / 2
        z = 2 * pos - 1
        return -torch.nn.functional.logsigmoid(z * logits).sum() / len(ids)

    ours = _loss_and_grads(x, y, ids, kind=kind, positives="caption")
    _check_peer(ours, torch_loss(x, y, kind, fn=reference), f"{kind} caption")
    # every id distinct: caption positives reduce to the standard loss
    distinct = _loss_and_grads(x, y, np.arange(12) * 7, kind=kind, positives="caption")
    _close(distinct[0], _loss_and_grads(x, y, ids, kind=kind)[0], "distinct ids")


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("impl", ["dense", "ring"])
def test_accuracy_and_scale_clamp(impl):
    mesh = _mesh((4,), ("data",))
    x, _, _ = _inputs(8, 16)
    y = x[::-1].copy()  # text i matches image B-1-i

    def run(a, b, raw):
        return contrastive_loss(jnp.asarray(a), jnp.asarray(b), raw, impl=impl, mesh=mesh)

    _, m = jax.jit(run)(x, y, jnp.float32(1.0))
    assert float(m["i2t_acc"]) == 0.0 and float(m["t2i_acc"]) == 0.0
    (_, m), g = jax.jit(jax.value_and_grad(run, argnums=2, has_aux=True))(x, x, 10.0)
    assert float(m["i2t_acc"]) == 1.0 and float(m["t2i_acc"]) == 1.0
    assert abs(float(m["logit_scale"]) - 100.0) < 1e-3  # clamped at ln 100
    assert float(g) == 0.0  # the clamp stops the gradient, as in CLIP
    assert "logit_bias" not in m


def test_bfloat16_embeddings_get_bfloat16_gradients():
    x, y, _ = _inputs(8, 16)
    x, y = jnp.asarray(x, jnp.bfloat16), jnp.asarray(y, jnp.bfloat16)

    def f(x, y):
        return contrastive_loss(x, y, jnp.float32(RAW_SCALE), kind="sigmoid", impl="ring")[0]

    gx, gy = jax.jit(jax.grad(f, argnums=(0, 1)))(x, y)
    assert gx.dtype == gy.dtype == jnp.bfloat16 and bool(jnp.isfinite(gx).all())


def test_caption_ids_hash_rows():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49408, (64, 77)).astype(np.int32)
    tokens[10] = tokens[3]
    tokens[20] = tokens[3]
    swapped = tokens[5].copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    one_off = tokens[6].copy()
    one_off[-1] += 1
    tokens = np.concatenate([tokens, swapped[None], one_off[None]])
    ids = np.asarray(jax.jit(caption_ids)(tokens))
    assert ids.dtype == np.int32 and ids.shape == (66,)
    assert ids[3] == ids[10] == ids[20]
    assert len(set(ids.tolist())) == 66 - 2  # all other rows differ, incl. swaps and one-offs
    np.testing.assert_array_equal(ids, np.asarray(caption_ids(tokens)))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_ring_temp_memory_is_flat_in_the_global_batch(kind):
    """Compile-time per-device temp memory (no run): ring flat from B=2b to 8b, dense grows."""

    def temp(impl, n, b=128, d=64):
        mesh = _mesh((n,), ("data",))
        emb = jax.ShapeDtypeStruct((n * b, d), jnp.float32, sharding=NamedSharding(
            mesh, P("data", None)))
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

        def f(x, y, s, t):
            return contrastive_loss(x, y, s, t, kind=kind, impl=impl, mesh=mesh)[0]

        step = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))
        return step.lower(emb, emb, scalar, scalar).compile().memory_analysis().temp_size_in_bytes

    assert temp("ring", 8) <= 1.1 * temp("ring", 2)
    assert temp("dense", 8) >= 3 * temp("dense", 2)


def test_bad_inputs_raise_clipjax_errors():
    x, y, ids = _inputs(8, 4)
    with pytest.raises(ClipjaxError, match="ids"):
        contrastive_loss(x, y, 1.0, positives="caption")
    with pytest.raises(ClipjaxError, match="class labels"):
        contrastive_loss(x, y, 1.0, positives="label")
    with pytest.raises(ClipjaxError, match="loss.kind"):
        contrastive_loss(x, y, 1.0, kind="hinge")
    with pytest.raises(ClipjaxError, match="one shape"):
        contrastive_loss(x, y[:4], 1.0)
    with pytest.raises(ClipjaxError, match="loss.chunk=3"):
        contrastive_loss(x, y, 1.0, impl="ring", chunk=3)
    with pytest.raises(ClipjaxError, match="does not split"):
        contrastive_loss(x[:6], y[:6], 1.0, mesh=_mesh((4,), ("data",)))
    with pytest.raises(ClipjaxError, match="batch_axes"):
        contrastive_loss(x, y, 1.0, mesh=_mesh((4,), ("data",)), batch_axes=("fsdp",))
    assert axes_of(_mesh((4, 2), ("data", "fsdp")), ("data", "fsdp")).size == 8


def test_config_checks_name_the_loss_key():
    c = config_lib.default_config()
    c.loss.chunk = 64
    with pytest.raises(ConfigError) as e:
        config_lib.validate(c)
    assert e.value.key == "loss.chunk"
    c.loss.impl = "ring"
    config_lib.validate(c)  # 64 divides the default batch 256
    assert options(c.loss) == {"kind": "softmax", "impl": "ring", "positives": "index",
                               "chunk": 64, "logit_scale_max": math.log(100.0)}
    c.loss.chunk = 96
    with pytest.raises(ConfigError, match="micro-batch"):
        config_lib.validate(c)
