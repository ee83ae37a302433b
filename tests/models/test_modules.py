"""Module behaviour: shapes, dtypes, BatchNorm train/eval, drop-path, shortcuts, init."""

import functools
import zlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax.models import BatchNorm, ResNet, create_model
from resnet_jax.models.layers import Shortcut, avg_pool_ceil, conv
from tests.conftest import require_cuda_plugin

TINY = dict(widths=(16, 16, 32, 32), stem_width=8, num_classes=7)


def _init(model, x, seed=0):
    return model.init(jax.random.key(seed), x, train=False)


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet50", "resnet50d", "resnext50_32x4d", "seresnet50", "resnetrs50"]
)
def test_forward_shapes_dtypes_and_stages(name):
    model = create_model(name, **TINY, dtype=jnp.bfloat16)
    x = jnp.ones((2, 64, 64, 3))
    variables = _init(model, x)
    chex.assert_trees_all_equal_dtypes(
        variables["params"], jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), variables["params"])
    )
    logits, stages = model.apply(variables, x, train=False, return_stages=True)
    chex.assert_shape(logits, (2, 7))
    assert logits.dtype == jnp.float32
    expansion = 1 if name == "resnet18" else 4
    widths = [w * expansion for w in TINY["widths"]]
    # Stem /4, then /1, /2, /2, /2.
    chex.assert_shape(stages, [(2, 16, 16, widths[0]), (2, 8, 8, widths[1]), (2, 4, 4, widths[2]), (2, 2, 2, widths[3])])
    assert all(s.dtype == jnp.bfloat16 for s in stages)


def test_num_classes_zero_returns_pooled_features():
    model = create_model("resnet18", **{**TINY, "num_classes": 0})
    x = jnp.ones((3, 32, 32, 3))
    variables = _init(model, x)
    assert "fc" not in variables["params"]
    feats, stages = model.apply(variables, x, train=False, return_stages=True)
    np.testing.assert_allclose(feats, stages[-1].mean(axis=(1, 2)), rtol=1e-6)


def test_cifar_resnet_shapes():
    model = create_model("resnet20")
    x = jnp.ones((2, 32, 32, 3))
    variables = _init(model, x)
    _, stages = model.apply(variables, x, train=False, return_stages=True)
    chex.assert_shape(stages, [(2, 32, 32, 16), (2, 16, 16, 32), (2, 8, 8, 64)])


def test_jit_equals_eager():
    model = create_model("resnet18", **TINY)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = _init(model, x)
    eager = model.apply(variables, x, train=False)
    jitted = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-5)


def _random_stats(variables, key):
    """Non-trivial running statistics (means ~ N(0, 0.5), variances ~ U(0.5, 1.5))."""

    def draw(path, leaf):
        k = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()))
        if path[-1].key == "mean":
            return 0.5 * jax.random.normal(k, leaf.shape)
        return jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5)

    stats = jax.tree_util.tree_map_with_path(draw, variables["batch_stats"])
    return {**variables, "batch_stats": stats}


def test_batch_stats_update_only_in_train_and_eval_uses_them():
    model = create_model("resnet18", **TINY)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = _random_stats(_init(model, x), jax.random.key(2))
    # Eval: batch_stats are read, not written; output depends on them.
    _, updates = model.apply(variables, x, train=False, mutable=["batch_stats"])
    chex.assert_trees_all_close(updates["batch_stats"], variables["batch_stats"])
    other = _random_stats(variables, jax.random.key(3))
    assert not np.allclose(model.apply(variables, x, train=False), model.apply(other, x, train=False))
    # Train: batch statistics are used (running ones don't matter) and running ones move.
    y1, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    y2, _ = model.apply(other, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    moved = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)), upd["batch_stats"], variables["batch_stats"])
    assert all(jax.tree_util.tree_leaves(moved))


def test_batchnorm_matches_flax_batchnorm():
    """Independent reference: flax.linen.BatchNorm with the same momentum and epsilon."""
    x = jax.random.normal(jax.random.key(0), (6, 5, 5, 4)) * 3 + 1
    ours = BatchNorm(momentum=0.9, epsilon=1e-5)
    ref = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
    v = ours.init(jax.random.key(0), x, train=False)
    v_ref = ref.init(jax.random.key(0), x, use_running_average=False)
    y, upd = ours.apply(v, x, train=True, mutable=["batch_stats"])
    y_ref, upd_ref = ref.apply(v_ref, x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], upd_ref["batch_stats"]["mean"], rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], upd_ref["batch_stats"]["var"], rtol=1e-5)
    y_eval = ours.apply({**v, **upd}, x, train=False)
    y_eval_ref = ref.apply({**v_ref, **upd_ref}, x, use_running_average=True)
    np.testing.assert_allclose(y_eval, y_eval_ref, rtol=1e-5, atol=1e-5)


def test_ghost_batchnorm_normalises_each_group_separately():
    x = np.asarray(jax.random.normal(jax.random.key(0), (8, 3, 3, 2))) * np.arange(1, 9)[:, None, None, None]
    bn = BatchNorm(group_size=4, epsilon=1e-5)
    v = bn.init(jax.random.key(0), x, train=False)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    for g in range(2):
        part = x[4 * g : 4 * g + 4]
        ref = (part - part.mean((0, 1, 2))) / np.sqrt(part.var((0, 1, 2)) + 1e-5)
        np.testing.assert_allclose(y[4 * g : 4 * g + 4], ref, rtol=1e-4, atol=1e-4)
    groups = x.reshape(2, 4 * 9, 2)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * groups.mean(1).mean(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * groups.var(1).mean(0), rtol=1e-4)
    with pytest.raises(ValueError, match="does not divide"):
        BatchNorm(group_size=3).apply(v, x, train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("activation, reference", [("relu", jax.nn.relu), ("swish", nn.swish)])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_with_its_activation_equals_the_activation_of_flax_batchnorm(activation, reference, train):
    """``BatchNorm(activation=...)`` (how the blocks call it) is the activation applied to
    flax.linen.BatchNorm's output: values and gradients, in training and evaluation."""
    from resnet_jax.models.layers import get_activation

    x = jax.random.normal(jax.random.key(5), (8, 4, 4, 6)) * 2 + 0.5
    cotangent = jax.random.normal(jax.random.key(6), x.shape)
    params = {"scale": 1 + 0.3 * jax.random.normal(jax.random.key(7), (6,)), "bias": jnp.linspace(-1, 1, 6)}
    stats = {"mean": jnp.linspace(0, 1, 6), "var": jnp.linspace(1, 2, 6)}
    ours = BatchNorm(epsilon=1e-5, activation=get_activation(activation))
    ref = nn.BatchNorm(epsilon=1e-5)

    def loss(kind, x, params):
        variables = {"params": params, "batch_stats": stats}
        if kind == "ours":
            y, _ = ours.apply(variables, x, train=train, mutable=["batch_stats"])
        else:
            y, _ = ref.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
            y = reference(y)
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.value_and_grad(functools.partial(loss, "ours"), argnums=(0, 1), has_aux=True)(x, params)
    (_, y_ref), grads_ref = jax.value_and_grad(functools.partial(loss, "ref"), argnums=(0, 1), has_aux=True)(x, params)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, grads_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group_size", [None, 4])
def test_batchnorm_gradients_match_flax_batchnorm(group_size):
    """Gradients for x, scale and bias equal flax.linen.BatchNorm's, applied per group
    of ``group_size`` examples for ghost BatchNorm (one-pass statistics must not change
    the derivative)."""
    x = jax.random.normal(jax.random.key(1), (8, 5, 5, 4)) * 3 + 1
    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    scale = jax.random.uniform(jax.random.key(3), (4,), minval=0.5, maxval=1.5)
    bias = jax.random.normal(jax.random.key(4), (4,))
    ours = BatchNorm(epsilon=1e-5, group_size=group_size)
    ref = nn.BatchNorm(epsilon=1e-5)
    stats = {"mean": jnp.zeros(4), "var": jnp.ones(4)}

    def loss_ours(x, scale, bias):
        variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
        y, _ = ours.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y * cotangent)

    def loss_ref(x, scale, bias):
        variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
        groups = jnp.split(x, 8 // (group_size or 8))
        ys = [ref.apply(variables, g, use_running_average=False, mutable=["batch_stats"])[0] for g in groups]
        return jnp.sum(jnp.concatenate(ys) * cotangent)

    grads = jax.grad(loss_ours, argnums=(0, 1, 2))(x, scale, bias)
    grads_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(x, scale, bias)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["relu", "relu_from_output"])
def test_relu_values_and_gradients_equal_jax_relu(name):
    """``relu`` is jax.nn.relu on this CPU; ``relu_from_output`` is what it is on a GPU."""
    from resnet_jax.models import layers

    relu = getattr(layers, name)

    x = jnp.concatenate([jax.random.normal(jax.random.key(0), (100,)), jnp.zeros(5), -jnp.zeros(5)])
    g = jax.random.normal(jax.random.key(1), x.shape)
    for dtype in (jnp.float32, jnp.bfloat16):
        xd, gd = x.astype(dtype), g.astype(dtype)
        chex.assert_trees_all_equal(relu(xd), jax.nn.relu(xd))
        chex.assert_trees_all_equal(jax.vjp(relu, xd)[1](gd), jax.vjp(jax.nn.relu, xd)[1](gd))
        chex.assert_trees_all_equal(jax.jvp(relu, (xd,), (gd,)), jax.jvp(jax.nn.relu, (xd,), (gd,)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2), (1, 1, 1, 1), (2, 12, 10, 4)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernel", ["parity", "planes", "strided_slices"])
def test_max_pool_values_and_derivatives_equal_flax_max_pool(shape, dtype, kernel):
    """The hand-written derivatives (the parity-plane pool, what ``max_pool_3x3_s2`` is on a
    GPU; the same with its reverse pass written plane by plane, a candidate; and the
    strided-slice one it replaced, both timed by ``benchmarks/stem_variants.py``) against
    flax's ``nn.max_pool`` (XLA's select-and-scatter), bit for bit, ties included: after a
    ReLU whole windows are 0, and the gradient must go to the first maximum of each window,
    as the reference's, and where windows overlap their shares are added in its order."""
    from benchmarks.stem_variants import max_pool_fused_gradient
    from resnet_jax.models.layers import max_pool_parity, max_pool_planes

    max_pool_3x3_s2 = {"parity": max_pool_parity, "planes": max_pool_planes,
                       "strided_slices": max_pool_fused_gradient}[kernel]

    def reference(x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    x = jax.random.normal(jax.random.key(0), shape)
    x = jnp.where(jax.random.bernoulli(jax.random.key(1), 0.5, shape), 0.0, x)  # ReLU-like: many ties at 0
    x = jnp.round(x * 2) / 2  # ties between nonzero values too
    x = x.astype(dtype)
    y_ref, pullback_ref = jax.vjp(reference, x)
    y, pullback = jax.vjp(max_pool_3x3_s2, x)
    chex.assert_trees_all_equal(y, y_ref)
    cotangent = jax.random.normal(jax.random.key(2), y.shape, dtype)
    chex.assert_trees_all_equal(pullback(cotangent), pullback_ref(cotangent))
    tangent = jax.random.normal(jax.random.key(3), shape, dtype)
    chex.assert_trees_all_equal(jax.jvp(max_pool_3x3_s2, (x,), (tangent,)), jax.jvp(reference, (x,), (tangent,)))


@pytest.mark.parametrize("kernel", ["parity", "planes"])
def test_max_pool_second_derivatives_equal_flax_max_pool(kernel):
    """Hessian-vector products (forward over reverse) and the gradient of a gradient norm
    (reverse over reverse) go through the GPU pools' hand-written derivatives as through
    ``nn.max_pool``'s (the planes pool's reverse pass is a ``linear_call``)."""
    from resnet_jax.models.layers import max_pool_parity, max_pool_planes

    pool = {"parity": max_pool_parity, "planes": max_pool_planes}[kernel]

    def reference(x):
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    x, v = (jax.random.normal(jax.random.key(k), (2, 9, 8, 3)) for k in (0, 1))
    for fn in (pool, reference):
        loss = lambda x, fn=fn: jnp.sum(jnp.sin(fn(x)) ** 2)  # noqa: E731
        got = (jax.jvp(jax.grad(loss), (x,), (v,))[1], jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x))
        if fn is pool:
            ours = got
    chex.assert_trees_all_close(ours, got, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["classic", "deep"])
@pytest.mark.parametrize("kernels", ["default", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stem_relu_after_the_max_pool_equals_the_textbook_order(kind, kernels, dtype, monkeypatch):
    """The stem applies its ReLU after the max pool. Against the textbook order built from
    flax's ops (BatchNorm, ``jax.nn.relu``, then ``nn.max_pool``), in train mode, the output
    and the gradients of the input and of every parameter are equal bit for bit. The inputs
    are integers, so that windows tie, and a third of the channels get a negative bias, so
    that whole windows are <= 0. ``cuda`` swaps in the GPU kernels (ReLU derivative from its
    output, the max pool's fused gradient), as the torchvision gradient test does."""
    from resnet_jax.models import layers
    from tests.conftest import use_cuda_kernels

    if kernels == "cuda":
        use_cuda_kernels(monkeypatch)
    act = layers.ACTIVATIONS["relu"]
    conv_f = functools.partial(conv, dtype=dtype)
    norm_f = functools.partial(BatchNorm, dtype=dtype)
    ours = layers.Stem(kind, 8, "max", conv_f, norm_f, act)
    # pool "none": the Stem keeps the textbook order, then flax's pool. The same ReLU, so that the
    # deep stem's inner BatchNorm + ReLU run the same kernels in both (its values and derivatives
    # equal jax.nn.relu's bit for bit: test_relu_values_and_gradients_equal_jax_relu)
    textbook = layers.Stem(kind, 8, "none", conv_f, norm_f, act)
    x = jnp.round(3 * jax.random.normal(jax.random.key(0), (2, 20, 20, 3))).astype(dtype)
    variables = ours.init(jax.random.key(1), x, train=False)
    params = jax.tree_util.tree_map(lambda p: jnp.round(4 * p) / 4 if p.ndim == 4 else p, variables["params"])
    params["bn1"]["bias"] = jnp.where(jnp.arange(params["bn1"]["bias"].shape[0]) % 3 == 0, -1.5, 0.25)

    def run(module, pool):
        def f(params, x):
            y, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                                mutable=["batch_stats"])
            return pool(y)
        return f

    f_ours = run(ours, lambda y: y)
    f_textbook = run(textbook, lambda y: nn.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
    y, pullback = jax.vjp(f_ours, params, x)
    y_ref, pullback_ref = jax.vjp(f_textbook, params, x)
    chex.assert_trees_all_equal(y, y_ref)
    assert 0.2 < float(jnp.mean(y == 0)) < 0.8, "the test needs windows that are all <= 0 and windows that are not"
    cotangent = jax.random.normal(jax.random.key(2), y.shape, y.dtype)
    chex.assert_trees_all_equal(pullback(cotangent), pullback_ref(cotangent))


@pytest.mark.parametrize("size", [(16, 16), (15, 17), (1, 2)])
@pytest.mark.parametrize("channels", [None, 16])
def test_space_to_depth_stem_convolution_and_weight_gradient_equal_torch_conv2d(size, channels):
    """``conv_7x7_s2_space_to_depth`` (the classic stem's convolution on a GPU) against torch's
    ``conv2d(stride=2, padding=3)`` under autograd, torchvision's ``conv1``: float32 values and
    weight gradients, even and odd image sizes, 12 folded channels and 16 (zero-padded)."""
    torch = pytest.importorskip("torch")
    from resnet_jax.models.layers import conv_7x7_s2_direct, conv_7x7_s2_space_to_depth

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, *size, 3)).astype(np.float32)
    kernel = rng.normal(size=(7, 7, 3, 5)).astype(np.float32)
    x_t = torch.tensor(x).permute(0, 3, 1, 2)
    k_t = torch.tensor(kernel).permute(3, 2, 0, 1).requires_grad_()
    y_t = torch.nn.functional.conv2d(x_t, k_t, stride=2, padding=3)
    cotangent = rng.normal(size=y_t.shape).astype(np.float32)
    y_t.backward(torch.tensor(cotangent))
    for impl in (functools.partial(conv_7x7_s2_space_to_depth, channels=channels), conv_7x7_s2_direct):
        y, pullback = jax.vjp(lambda k: impl(jnp.asarray(x), k), jnp.asarray(kernel))
        (dkernel,) = pullback(jnp.asarray(cotangent).transpose(0, 2, 3, 1))
        np.testing.assert_allclose(np.asarray(y), y_t.detach().permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(dkernel), k_t.grad.permute(2, 3, 1, 0).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="7x7"):
        conv_7x7_s2_space_to_depth(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4)))


def test_space_to_depth_stem_convolution_in_bf16_is_as_accurate_as_the_direct_one():
    """In bf16 (float32 accumulation, one rounding of each output and weight gradient) the
    folded convolution's error against the float32 convolution of the same bf16 inputs is
    no larger than the direct convolution's: the same sums, in another order."""
    from resnet_jax.models.layers import conv_7x7_s2_direct, conv_7x7_s2_space_to_depth

    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (4, 32, 32, 3)).astype(jnp.bfloat16)
    kernel = (0.1 * jax.random.normal(keys[1], (7, 7, 3, 32))).astype(jnp.bfloat16)
    ct = jax.random.normal(keys[2], (4, 16, 16, 32)).astype(jnp.bfloat16)

    def value_and_weight_gradient(impl, dtype):
        y, pullback = jax.vjp(lambda k: impl(x.astype(dtype), k), kernel.astype(dtype))
        return [np.asarray(a, np.float32) for a in (y, pullback(ct.astype(dtype))[0])]

    exact = value_and_weight_gradient(conv_7x7_s2_direct, jnp.float32)
    errors = {impl.__name__: [np.max(np.abs(a - e)) / np.max(np.abs(e))
                              for a, e in zip(value_and_weight_gradient(impl, jnp.bfloat16), exact)]
              for impl in (conv_7x7_s2_direct, conv_7x7_s2_space_to_depth)}
    direct, folded = errors["conv_7x7_s2_direct"], errors["conv_7x7_s2_space_to_depth"]
    assert all(0 < d < 1e-2 for d in direct), direct  # bf16 is really in use
    assert all(f <= 1.25 * d for f, d in zip(folded, direct)), errors


def test_the_stem_convolution_adapter_leaves_other_convolutions_to_lax():
    """``as_lax_conv`` computes the 7x7/2 stem convolution with its function and passes any other
    call (another shape, or an option the function does not take) to ``lax`` unchanged."""
    from resnet_jax.models.layers import as_lax_conv

    calls = []
    adapter = as_lax_conv(lambda x, k: calls.append(x.shape) or jnp.zeros(()))
    x, k3 = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    want = jax.lax.conv_general_dilated(x, k3, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = adapter(x, k3, (1, 1), [(1, 1), (1, 1)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(got, want)
    k7 = jnp.ones((7, 7, 3, 4))
    adapter(x, k7, (2, 2), [(3, 3), (3, 3)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision.HIGHEST)
    assert calls == []
    adapter(x, k7, (2, 2), [(3, 3), (3, 3)], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert calls == [(1, 8, 8, 3)]


def test_max_pool_backward_on_an_h100_moves_a_third_of_flax_max_pools_bytes():
    """XLA:GPU lowers nn.max_pool's gradient to a scatter fed by four int32 index tensors;
    ``max_pool_3x3_s2`` compiled for a GPU is one fused pass over the input, the output and
    the cotangent (the stem of a ResNet at 112x112x64)."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import target_devices, DEFAULT_TARGET
    from benchmarks.hlo_traffic import entry_kernels
    from resnet_jax.models.layers import max_pool_3x3_s2

    device = target_devices(DEFAULT_TARGET)[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((8, 112, 112, 64), jnp.bfloat16, sharding=sharding)

    def traffic(pool):
        step = jax.jit(jax.grad(lambda x: jnp.sum(pool(x).astype(jnp.float32) ** 2)))
        return sum(k.bytes for k in entry_kernels(step.lower(x).compile().as_text()))

    ours = traffic(max_pool_3x3_s2)
    flax_pool = traffic(lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
    print(f"max pool forward + backward: ours {ours / 2**20:.1f} MiB, nn.max_pool {flax_pool / 2**20:.1f} MiB")
    assert ours <= flax_pool / 3


def test_the_plane_by_plane_pool_gradient_is_one_concatenation_on_an_h100():
    """``max_pool_planes`` (a candidate): compiled for an H100, its reverse pass is one
    concatenate fusion that writes each 2x2 parity plane of the input gradient from its own
    1, 2 or 4 terms, moving no more bytes than the derived transpose of ``max_pool_parity``,
    whose loop fusion adds nine padded terms at every element."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import target_devices, DEFAULT_TARGET
    from benchmarks.hlo_traffic import entry_kernels
    from resnet_jax.models.layers import max_pool_parity, max_pool_planes

    sharding = jax.sharding.SingleDeviceSharding(target_devices(DEFAULT_TARGET)[0])
    x = jax.ShapeDtypeStruct((8, 112, 112, 64), jnp.bfloat16, sharding=sharding)
    ct = jax.ShapeDtypeStruct((8, 56, 56, 64), jnp.bfloat16, sharding=sharding)

    def kernels(pool):
        return entry_kernels(jax.jit(lambda x, ct: jax.vjp(pool, x)[1](ct)).lower(x, ct).compile().as_text())

    planes, parity = kernels(max_pool_planes), kernels(max_pool_parity)
    assert sum(k.bytes for k in planes) <= sum(k.bytes for k in parity)
    assert len(planes) == len(parity) == 2  # forward (max and first-max index), then the gradient
    assert "concatenate" in planes[-1].name and "concatenate" not in parity[-1].name


def test_forward_mode_autodiff_through_a_training_model():
    """jax.jvp (forward mode: NTK, Hessian-vector products) works through a training model
    (BatchNorm statistics, ReLU, max pool) and agrees with a finite difference. The GPU
    versions of ReLU and max pool are checked in forward mode above."""
    model = create_model("resnet18", **TINY)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    v = _init(model, x)
    direction = jax.random.normal(jax.random.key(1), x.shape)

    def f(images):
        return model.apply(v, images, train=True, mutable=["batch_stats"])[0]

    _, tangent = jax.jvp(f, (x,), (direction,))
    eps = 1e-3
    finite = (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
    np.testing.assert_allclose(tangent, finite, rtol=2e-2, atol=2e-3)


def _h100_activation_bytes_per_image(name: str, size: int) -> float:
    """Device memory per image that XLA assigns to the train step compiled for an H100:
    temporaries at batch 16 minus batch 8, over 8 (what does not grow with the batch,
    gradients and workspaces, cancels). Compiled without a GPU by the CUDA plugin."""
    require_cuda_plugin()
    from benchmarks.gpu_compile_report import compile_report

    temp = [compile_report(name, batch, size, "bfloat16")[0]["temp_gib"] * 2**30 for batch in (8, 16)]
    return (temp[1] - temp[0]) / 8


def _torchvision_saved_bytes_per_image(name: str, size: int, batch: int) -> float:
    """The peer: bytes per image torchvision's model saves for backward under bf16 autocast
    (channels_last, as peer_torchvision.py), counted with autograd's saved-tensor hooks."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10).to(memory_format=torch.channels_last).train()
    images = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    storages = {}

    def pack(t):
        if t.dim() >= 2 and t.shape[0] == batch:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images).float().logsumexp(-1).mean()
    return sum(storages.values()) / batch


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_h100_train_step_keeps_no_more_activation_memory_than_torchvision(name):
    """What the compiled train step keeps per image on an H100 (XLA's buffer assignment)
    against what torchvision saves for backward under bf16 autocast. A BatchNorm that keeps
    a float32 x_hat for its backward pass exceeds it (ResNet-18: 1.58 against 0.93 MiB)."""
    ours = _h100_activation_bytes_per_image(name, 64)
    peer = _torchvision_saved_bytes_per_image(name, 64, 4)
    print(f"{name}: ours {ours / 2**20:.2f} MiB/img, torchvision {peer / 2**20:.2f} MiB/img")
    assert ours <= peer, (ours / 2**20, peer / 2**20)


def test_drop_path_and_dropout_active_only_in_train():
    model = create_model("resnet18", **TINY, drop_path_rate=0.5, dropout_rate=0.5)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    variables = _init(model, x)
    variables = {**variables, "params": jax.tree_util.tree_map(lambda p: p + 0.1, variables["params"])}
    e1 = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(1)})
    e2 = model.apply(variables, x, train=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(e1, e2)
    t1, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    t2, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    assert not np.allclose(t1, t2)


def test_drop_path_rates_rise_linearly():
    model = create_model("resnet18", **TINY, drop_path_rate=0.7)
    x = jnp.ones((1, 32, 32, 3))
    rates = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout) and context.module.name == "drop_path":
            rates.append(context.module.rate)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: _init(model, x))
    # 8 blocks: block 0 has rate 0 (no drop layer), then k * 0.7 / 7.
    np.testing.assert_allclose(rates, [0.1 * k for k in range(1, 8)], rtol=1e-6)


def test_drop_path_drops_whole_examples():
    """A dropped residual branch leaves relu(shortcut) for that example exactly."""
    from resnet_jax.models.blocks import BasicBlock

    block = BasicBlock(
        planes=4, strides=1, conv=conv, norm=BatchNorm, act=nn.relu, drop_path_rate=0.5, zero_init_last=False
    )
    x = jax.random.normal(jax.random.key(0), (64, 4, 4, 4))
    v = block.init(jax.random.key(0), x, train=False)
    y, _ = block.apply(v, x, train=True, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
    identity = np.all(np.isclose(y, nn.relu(x)), axis=(1, 2, 3))
    assert 16 < identity.sum() < 48  # about half the examples, each all-or-nothing


def test_zero_init_last_and_kaiming_fan_out_init():
    model = create_model("resnet50", num_classes=10)
    v = _init(model, jnp.ones((1, 32, 32, 3)))
    assert np.all(v["params"]["layer1_0"]["bn3"]["scale"] == 0)
    assert np.all(v["params"]["layer1_0"]["bn1"]["scale"] == 1)
    off = create_model("resnet50", num_classes=10, zero_init_last=False)
    assert np.all(_init(off, jnp.ones((1, 32, 32, 3)))["params"]["layer1_0"]["bn3"]["scale"] == 1)
    # Kaiming normal, fan_out: std = sqrt(2 / (k * k * C_out)), untruncated.
    kernel = np.asarray(v["params"]["layer4_0"]["conv2"]["kernel"])  # 3x3x512x512
    assert kernel.std() == pytest.approx(np.sqrt(2 / (9 * 512)), rel=0.02)
    assert np.abs(kernel).max() > 3 * kernel.std()  # a truncated normal would stop at 2 std
    fc = np.asarray(v["params"]["fc"]["kernel"])  # torch Linear default: U(+-1/sqrt(fan_in))
    assert np.abs(fc).max() <= 1 / np.sqrt(2048) + 1e-7


def test_v1_puts_stride_on_first_1x1():
    x = jnp.ones((1, 32, 32, 3))
    for on_1x1, (s1, s2) in ((True, (2, 1)), (False, (1, 2))):
        model = create_model("resnet50", **TINY, stride_on_1x1=on_1x1)
        strides = {}

        def record(next_fun, args, kwargs, context):
            m = context.module
            if isinstance(m, nn.Conv) and m.scope.path[-2:-1] == ("layer2_0",):
                strides[m.name] = m.strides[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(lambda: _init(model, x))
        assert (strides["conv1"], strides["conv2"], strides["conv3"]) == (s1, s2, 1)


def test_option_a_zero_pad_shortcut_closed_form():
    x = np.arange(2 * 4 * 4 * 16, dtype=np.float32).reshape(2, 4, 4, 16)
    y = Shortcut("zero_pad", 32, 2, conv, BatchNorm).apply({}, jnp.asarray(x), train=False)
    ref = np.zeros((2, 2, 2, 32), np.float32)
    ref[..., 8:24] = x[:, ::2, ::2, :]  # torch: F.pad(x[:, :, ::2, ::2], (..., planes//4, planes//4))
    np.testing.assert_array_equal(y, ref)


@pytest.mark.parametrize("shape,stride", [((2, 6, 6, 3), 2), ((2, 7, 5, 4), 2), ((1, 9, 9, 2), 3)])
def test_subsample_fanout_is_the_input_and_its_subsample_with_slicings_derivatives(shape, stride):
    """``subsample_fanout`` (change 23): the values are (x, every stride-th pixel); the gradient
    of x is the branch's cotangent plus the subsample's, zero-padded back to x's pixels (closed
    form, odd sizes included); forward mode gives the tangent and its subsample; a cotangent on
    one output alone works (the other is a symbolic zero)."""
    from resnet_jax.models.layers import subsample_fanout

    x, g, t = (jax.random.normal(jax.random.key(i), shape) for i in range(3))
    whole, sub = subsample_fanout(x, stride)
    chex.assert_trees_all_equal((whole, sub), (x, x[:, ::stride, ::stride, :]))
    g_sub = jax.random.normal(jax.random.key(3), sub.shape)
    _, vjp = jax.vjp(lambda x: subsample_fanout(x, stride), x)
    padded = np.zeros(shape, np.float32)
    padded[:, ::stride, ::stride, :] = g_sub
    np.testing.assert_array_equal(vjp((g, g_sub))[0], np.asarray(g) + padded)
    _, (t_whole, t_sub) = jax.jvp(lambda x: subsample_fanout(x, stride), (x,), (t,))
    chex.assert_trees_all_equal((t_whole, t_sub), (t, t[:, ::stride, ::stride, :]))
    only_sub = jax.grad(lambda x: jnp.sum(subsample_fanout(x, stride)[1] * g_sub))(x)
    np.testing.assert_array_equal(only_sub, padded)
    bf16 = jax.grad(lambda x: jnp.sum(jnp.sin(subsample_fanout(x, stride)[0]))
                    + jnp.sum(subsample_fanout(x, stride)[1]).astype(jnp.float32))(x.astype(jnp.bfloat16))
    reference = jax.grad(lambda x: jnp.sum(jnp.sin(x)) + jnp.sum(x[:, ::stride, ::stride, :]).astype(jnp.float32))(
        x.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bf16, reference)


def test_subsample_fanout_split_by_examples_over_devices_adds_each_devices_rows():
    """The batch split over 4 devices: the same gradient as on one device, and the reverse pass
    needs no collective (each device adds its own examples' subsample)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from resnet_jax.models.layers import subsample_fanout

    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 4))
    g_sub = jax.random.normal(jax.random.key(1), (8, 4, 4, 4))

    def loss(x):
        whole, sub = subsample_fanout(x, 2)
        return jnp.sum(jnp.cos(whole)) + jnp.sum(sub * g_sub)

    want = jax.grad(loss)(x)
    split = NamedSharding(mesh, PartitionSpec("data"))
    step = jax.jit(jax.grad(loss), in_shardings=split, out_shardings=split)
    np.testing.assert_allclose(step(x), want, rtol=1e-6)
    hlo = step.lower(x).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute")), hlo


def test_avg_down_pool_is_ceil_mode_without_padding_counts():
    x = np.arange(25, dtype=np.float32).reshape(1, 5, 5, 1)
    y = np.asarray(avg_pool_ceil(jnp.asarray(x), 2))[0, :, :, 0]
    g = x[0, :, :, 0]
    # torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) on a 5x5 input.
    ref = np.array([[g[i : i + 2, j : j + 2].mean() for j in (0, 2, 4)] for i in (0, 2, 4)])
    np.testing.assert_allclose(y, ref)


def test_plain_network_has_no_shortcut():
    """Plain nets: zeroing a block's residual branch zeroes its output (no identity path)."""
    model = create_model("plain20")
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    v = _init(model, x)
    params = jax.tree_util.tree_map(lambda a: a, v["params"])
    params["layer1_0"]["bn2"]["scale"] = jnp.zeros_like(params["layer1_0"]["bn2"]["scale"])
    params["layer1_0"]["bn2"]["bias"] = jnp.zeros_like(params["layer1_0"]["bn2"]["bias"])
    _, stages = model.apply({**v, "params": params}, x, train=False, return_stages=True)
    residual = create_model("resnet20")
    _, stages_res = residual.apply({**v, "params": params}, x, train=False, return_stages=True)
    assert not np.allclose(stages[0], stages_res[0])


def test_bad_arguments_raise_clear_errors():
    x = jnp.ones((1, 32, 32, 3))
    with pytest.raises(ValueError, match="same length"):
        _init(ResNet(stage_sizes=(1, 1), widths=(8, 8, 8)), x)
    with pytest.raises(ValueError, match="unknown block"):
        _init(ResNet(stage_sizes=(1,), widths=(8,), block="bottle"), x)
    with pytest.raises(ValueError, match="unknown activation"):
        _init(ResNet(stage_sizes=(1,), widths=(8,), activation="gelu2"), x)
