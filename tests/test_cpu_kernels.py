"""Our CPU kernels (cpu_kernels/): every operator on every shape ResNet-18/20/50 give it,
against Paddle's kernels; every network of models/ on them against Paddle's kernels, in
fp32 and bf16, training and evaluation; and training with them against training without.

Where the library cannot be built, the tests that need it skip and the fallback tests
still run. CI runs one suite each way and says which to expect (.ci/run):
CPU_KERNELS_EXPECTED=built (the headers installed: a failed build fails) or =absent (no
headers: the suite runs as a user's who skipped them, on Paddle's kernels).
"""
import ctypes
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
import yaml

import models
import cpu_kernels
from cpu_kernels import build, kernels
import train_cifar10
import eval as eval_script
from helpers import make_cifar_archive, once_with_the_operators

OP, WHY_NOT = cpu_kernels.load()
needs_op = pytest.mark.skipif(OP is None, reason=f"cpu_kernels unavailable: {WHY_NOT}")


# The kernels as the layers of models/layers.py run them, one call each
def batch_norm(layer, x, act=None, nhwc=False, fork=False):
    """Our BatchNorm kernel on ``layer`` (a BatchNorm2D), with ``act`` after it (None,
    "relu", "gelu"; True is "relu")."""
    layer.act = "relu" if act is True else act or None
    layer.activation = lambda y: models.layers.activate(y, layer.act)
    y, y2 = kernels.batch_norm(layer, x, nhwc)
    return (y, y2) if fork else y


def join(out, x, shortcut, nhwc=False, fork=False, act="relu"):
    """Our residual join: relu(out + shortcut(x)) (or the sum, ``act`` None), ``shortcut`` a
    ResidualJoin (option A) or None (the identity)."""
    shortcut = shortcut or models.ResidualJoin()
    shortcut.act = act
    y, y2 = kernels.residual_join(shortcut, out, x, nhwc)
    return (y, y2) if fork else y


def mean_pool(x):
    """The pooled features [N, C] of NHWC activations."""
    return kernels.mean_pool(None, x, nhwc=True).reshape([x.shape[0], x.shape[3]])


def max_pool(x, nhwc, kernel=3, stride=2, padding=1):
    return kernels.max_pool(models.MaxPool2D(kernel, stride, padding), x, nhwc)[0]


def test_the_operator_is_what_this_environment_expects():
    expected = os.environ.get("CPU_KERNELS_EXPECTED")
    if expected == "built":
        assert OP is not None, f"cpu_kernels is required here and unavailable: {WHY_NOT}"
    elif expected == "absent":
        assert OP is None and "no oneDNN headers" in WHY_NOT, WHY_NOT
    else:
        pytest.skip("CPU_KERNELS_EXPECTED is not set (CI sets it)")


@needs_op
def test_our_loops_share_the_openmp_runtime_paddles_onednn_runs_on():
    """Inside Paddle, oneDNN's GOMP_* calls bind to Paddle's libiomp5: the operator must
    bind there too (one thread team), not to a libgomp of its own."""
    iomp = os.path.join(build.PADDLE_LIBS, "libiomp5.so")
    if not os.path.exists(iomp):
        pytest.skip("this Paddle ships no libiomp5: oneDNN and the operator both run on libgomp")
    so = os.path.join(os.path.dirname(OP.__file__), "cpu_kernels_op.so")
    address = lambda lib: ctypes.cast(ctypes.CDLL(lib).GOMP_parallel, ctypes.c_void_p).value
    assert address(so) == address(iomp)


def conv_shapes(model, size):
    """(input shape, weight shape, stride, padding) of every Conv2D call of ``model`` on a
    batch of 2 images of ``size``, each distinct shape once."""
    seen = {}

    def record(layer, inputs):
        assert cpu_kernels.covered(layer), f"{layer} is not covered by the operator"
        seen[(tuple(inputs[0].shape), tuple(layer.weight.shape), layer._stride[0], layer._updated_padding[0])] = True
    hooks = [m.register_forward_pre_hook(record) for m in model.sublayers() if isinstance(m, paddle.nn.Conv2D)]
    with paddle.no_grad():
        model.eval()
        model(paddle.zeros([2, 3, size, size]))
    for h in hooks:
        h.remove()
    return list(seen)


PER_MODEL = dict(resnet20=conv_shapes(models.resnet20(), 32), resnet18_cifar=conv_shapes(models.resnet18(stem="cifar"), 32),
                 resnet18=conv_shapes(models.resnet18(), 224), resnet50=conv_shapes(models.resnet50(), 224))
SHAPES = sorted(set(sum(PER_MODEL.values(), [])))


def test_the_shape_list_is_complete():
    # ResNet-20: the stem and two 3x3 per stage (stride 1, and 2 entering stages 2-3; its shortcuts
    # have no convolution); ResNet-18: stem, 3x3 pairs and the 1x1/2 shortcuts of stages 2-4;
    # ResNet-50 adds the bottlenecks' 1x1 convolutions; the ImageNet stem is a 7x7/2.
    assert {k: len(v) for k, v in PER_MODEL.items()} == dict(resnet20=6, resnet18_cifar=11, resnet18=11, resnet50=23)
    kinds = {(w[2], stride, pad) for _, w, stride, pad in SHAPES}
    assert kinds == {(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0), (7, 2, 3)}
    assert len(SHAPES) == 46


@pytest.mark.parametrize("nhwc", [False, True])
@pytest.mark.parametrize("x_shape,w_shape,stride,padding", SHAPES)
@needs_op
def test_forward_and_both_gradients_equal_paddles(x_shape, w_shape, stride, padding, nhwc):
    rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
    x = paddle.to_tensor(rng.standard_normal(x_shape, dtype=np.float32), stop_gradient=False)
    w = paddle.to_tensor(rng.standard_normal(w_shape, dtype=np.float32) * 0.1, stop_gradient=False)
    ref = F.conv2d(x, w, stride=stride, padding=padding)
    grad = paddle.to_tensor(rng.standard_normal(ref.shape, dtype=np.float32))
    want = [ref, *paddle.grad([ref], [x, w], [grad])]
    if nhwc:  # the same tensors in NHWC, the results turned back to compare
        xt = paddle.to_tensor(x.numpy().transpose(0, 2, 3, 1), stop_gradient=False)
        ours = OP.onednn_conv2d(xt, w, stride, padding, True, True)
        got = [ours, *paddle.grad([ours], [xt, w], [paddle.to_tensor(grad.numpy().transpose(0, 2, 3, 1))])]
        got = [got[0].numpy().transpose(0, 3, 1, 2), got[1].numpy().transpose(0, 3, 1, 2), got[2].numpy()]
    else:
        ours = OP.onednn_conv2d(x, w, stride, padding, True, False)
        got = [t.numpy() for t in [ours, *paddle.grad([ours], [x, w], [grad])]]
    for name, a, b in zip(("out", "grad x", "grad w"), got, want):
        assert a.shape == tuple(b.shape), name
        relative = np.abs(a - b.numpy()).max() / np.abs(b.numpy()).max()
        assert relative <= 1e-4, f"{name}: relative error {relative:.2e}"


def norm_and_join_shapes(model, size):
    """The BatchNorm input shapes and the residual joins ((out, block input, stride)) of
    ``model`` on 2 images of ``size``, each distinct one once."""
    norms, joins = {}, {}
    blocks = (models.ResidualBlock, models.BottleneckBlock)

    def record_norm(layer, inputs):
        norms[tuple(inputs[0].shape)] = True

    def record_join(block, inputs, output):
        if block.join is not None:
            stride = block.join.stride
            shape = tuple(inputs[0].shape) if stride > 1 or block.downsample is None else tuple(output.shape)
            joins[(tuple(output.shape), shape, stride)] = True
    hooks = [m.register_forward_pre_hook(record_norm) for m in model.sublayers() if isinstance(m, paddle.nn.BatchNorm2D)]
    hooks += [m.register_forward_post_hook(record_join) for m in model.sublayers() if isinstance(m, blocks)]
    with paddle.no_grad():
        model.eval()
        model(paddle.zeros([2, 3, size, size]))
    for h in hooks:
        h.remove()
    return list(norms), list(joins)


NETS = dict(resnet20=(models.resnet20, 32), resnet18_cifar=(lambda: models.resnet18(stem="cifar"), 32),
            resnet18=(models.resnet18, 224), resnet50=(models.resnet50, 224))
NORM_JOIN = {name: norm_and_join_shapes(make(), size) for name, (make, size) in NETS.items()}
NORM_SHAPES = sorted(set(sum((v[0] for v in NORM_JOIN.values()), [])))
# the fast networks' joins are identities: JOIN_SHAPES has them
FAST_NORM_SHAPES = sorted(set(sum((norm_and_join_shapes(make(), 32)[0] for make in (models.fast_resnet,
                                                                                      models.fast_resnet_small)), [])))
JOIN_SHAPES = sorted(set(sum((v[1] for v in NORM_JOIN.values()), [])))


def test_the_norm_and_join_lists_are_complete():
    # ResNet-20: 16/32/64 channels at 32/16/8 pixels, two option-A joins (stride 2) and
    # three identity shapes; ResNet-18/50 join their projections at stride 1 (ResNet-50: every
    # stage a 1x1-reduced, a 3x3 and an expanded width, the stride-2 3x3 after its 1x1)
    assert {k: (len(v[0]), len(v[1])) for k, v in NORM_JOIN.items()} == dict(
        resnet20=(3, 5), resnet18_cifar=(4, 4), resnet18=(5, 4), resnet50=(12, 4))
    assert {stride for _, _, stride in JOIN_SHAPES} == {1, 2}


def relative(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def pre_activation(x, layer):
    """BatchNorm's output before the ReLU, in float64. Where it is within rounding of zero
    either side of the kink is right, and ours (x * a + b) and Paddle's ((x - mean) * a +
    shift) round differently there: one element of ResNet-18's [2, 2048, 7, 7] did, on one
    thread. The tests give such elements no gradient: they compare arithmetic, not that."""
    axes = (0, 2, 3)
    mean, variance = x.mean(axes, dtype=np.float64, keepdims=True), x.var(axes, dtype=np.float64, keepdims=True)
    weight, bias = (p.numpy().astype(np.float64).reshape(1, -1, 1, 1) for p in (layer.weight, layer.bias))
    return (x - mean) / np.sqrt(variance + layer._epsilon) * weight + bias


def nhwc(t):
    return paddle.to_tensor(t.numpy().transpose(0, 2, 3, 1), stop_gradient=t.stop_gradient)


def nchw(t):
    return t.numpy().transpose(0, 3, 1, 2)


@needs_op
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("shape", NORM_SHAPES + FAST_NORM_SHAPES)
def test_batch_norm_act_equals_paddles_with_its_running_statistics(shape, act, layout):
    """The same arithmetic as Paddle's kernel (two-pass mean and biased variance), then
    the activation: the output, the three gradients and the running statistics agree to
    1e-5 relative, in either layout (NHWC: the same tensors transposed, the results turned
    back). GELU is the exact one (erf), ours to 1.5e-7 of its CDF."""
    relu = act == "relu"
    rng = np.random.default_rng(sum(shape))
    ours, theirs = paddle.nn.BatchNorm2D(shape[1]), paddle.nn.BatchNorm2D(shape[1])
    for layer in (ours, theirs):
        layer.weight.set_value(np.linspace(0.5, 1.5, shape[1]).astype(np.float32))
        layer.bias.set_value(np.linspace(-0.2, 0.3, shape[1]).astype(np.float32))
    x = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32) * 2 + 0.5, stop_gradient=False)
    grad = rng.standard_normal(shape, dtype=np.float32)
    if relu:  # no gradient arrives at the ReLU's kink (see pre_activation)
        grad[np.abs(pre_activation(x.numpy(), ours)) < 1e-4] = 0
    grad = paddle.to_tensor(grad)
    ref = models.layers.activate(theirs(x), act)
    want = [t.numpy() for t in [ref, *paddle.grad([ref], [x, theirs.weight, theirs.bias], [grad])]]
    if layout == "nhwc":
        xt = nhwc(x)
        y = batch_norm(ours, xt, act, nhwc=True)
        got = [y, *paddle.grad([y], [xt, ours.weight, ours.bias], [nhwc(grad)])]
        got = [nchw(got[0]), nchw(got[1]), got[2].numpy(), got[3].numpy()]
    else:
        y = batch_norm(ours, x, act)
        got = [t.numpy() for t in [y, *paddle.grad([y], [x, ours.weight, ours.bias], [grad])]]
    for name, a, b in zip(("out", "grad x", "grad scale", "grad shift"), got, want):
        assert relative(a, b) <= 1e-5, name
    for name in ("_mean", "_variance"):
        assert relative(getattr(ours, name).numpy(), getattr(theirs, name).numpy()) <= 1e-5, name
    ours.eval()  # evaluation: Paddle's own kernel on the running statistics
    np.testing.assert_array_equal(batch_norm(ours, x, act).numpy(), models.layers.activate(ours(x), act).numpy())


@needs_op
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("shape", FAST_NORM_SHAPES[:2] + NORM_SHAPES[:1])
def test_evaluation_without_gradients_is_paddles_batch_norm_and_activation(shape, act):
    """Evaluation under no_grad (NHWC) runs the operator's inference pass: Paddle's
    batch_norm on the running statistics, then the activation, to 1e-5 (x * a + b against
    (x - mean) * a + shift); in bf16 within one rounding of it."""
    rng = np.random.default_rng(sum(shape))
    layer = models.BatchNormAct2D(shape[1], act=act)
    layer._mean.set_value(rng.standard_normal(shape[1]).astype(np.float32))
    layer._variance.set_value((0.5 + rng.random(shape[1])).astype(np.float32))
    layer.bias.set_value(rng.standard_normal(shape[1]).astype(np.float32) * 0.3)
    layer.eval()
    x = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32) * 2)
    want = layer(x).numpy()
    with paddle.no_grad():
        got = nchw(kernels.batch_norm(layer, nhwc(x), nhwc=True)[0])
        got16 = kernels.batch_norm(layer, nhwc(x).astype("bfloat16"), nhwc=True)[0]
    assert relative(got, want) <= 1e-5
    assert relative(nchw(got16.astype("float32")), want) <= 1e-2


@needs_op
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_the_operator_moves_the_layers_running_statistics_as_paddle_does(layout):
    """Three training steps at momentum 0.8: the operator updates the layer's own _mean
    and _variance (the tensors its state_dict, and so a checkpoint, holds) as Paddle's
    kernel does, the momentum compounding; evaluation leaves them alone."""
    rng = np.random.default_rng(3)
    ours, theirs = paddle.nn.BatchNorm2D(16, momentum=0.8), paddle.nn.BatchNorm2D(16, momentum=0.8)
    saved = ours.state_dict()["_mean"]
    for step in range(3):
        x = paddle.to_tensor(rng.standard_normal((4, 16, 6, 6), dtype=np.float32) * (step + 1) + step)
        theirs(x)
        batch_norm(ours, nhwc(x) if layout == "nhwc" else x, nhwc=layout == "nhwc")
    for name in ("_mean", "_variance"):
        assert relative(getattr(ours, name).numpy(), getattr(theirs, name).numpy()) <= 1e-5, name
    np.testing.assert_array_equal(saved.numpy(), ours._mean.numpy())
    before = ours._variance.numpy().copy()
    ours.eval()
    batch_norm(ours, x)
    np.testing.assert_array_equal(ours._variance.numpy(), before)


@needs_op
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", [None, "relu"])
@pytest.mark.parametrize("out_shape,in_shape,stride", JOIN_SHAPES)
def test_the_residual_join_equals_relu_of_the_sum(out_shape, in_shape, stride, layout, act):
    """relu(out + shortcut(x)) (or the sum alone) and both gradients exactly (the same sums
    in one pass)."""
    rng = np.random.default_rng(sum(out_shape) + stride)
    out = paddle.to_tensor(rng.standard_normal(out_shape, dtype=np.float32), stop_gradient=False)
    x = paddle.to_tensor(rng.standard_normal(in_shape, dtype=np.float32), stop_gradient=False)
    shortcut = models.ResidualJoin(stride, out_shape[1] - in_shape[1]) if stride > 1 else None
    ref = models.layers.activate(out + (shortcut.option_a(x) if shortcut else x), act)
    grad = paddle.to_tensor(rng.standard_normal(out_shape, dtype=np.float32))
    want = [t.numpy() for t in [ref, *paddle.grad([ref], [out, x], [grad])]]
    if layout == "nhwc":
        ot, xt = nhwc(out), nhwc(x)
        y = join(ot, xt, shortcut, nhwc=True, act=act)
        got = [nchw(t) for t in [y, *paddle.grad([y], [ot, xt], [nhwc(grad)])]]
    else:
        y = join(out, x, shortcut, act=act)
        got = [t.numpy() for t in [y, *paddle.grad([y], [out, x], [grad])]]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@needs_op
@pytest.mark.parametrize("op", ["norm", "join"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_forked_output_adds_both_consumers_gradients(op, dtype):
    """A forked output (two tensors on one memory, for a block's convolution and its
    shortcut): the operator's backward adds the two gradients as Paddle adds those of one
    tensor used twice, in fp32 to the bit; and with only the first used, the second counts
    as zero. In bf16 the sum is not rounded before it is used: within one rounding."""
    if dtype == "bfloat16" and BF16_UNITS is None:
        pytest.skip("this CPU has no bf16 units")
    rng = np.random.default_rng(5)
    shape = (4, 8, 8, 16)
    x = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32) + 0.3).astype(dtype)
    other = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    x.stop_gradient = other.stop_gradient = False
    g1, g2 = (paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32)).astype(dtype) for _ in range(2))
    layers = [paddle.nn.BatchNorm2D(16) for _ in range(3)]

    def outputs(layer, fork):
        if op == "norm":
            return batch_norm(layer, x, "relu", nhwc=True, fork=fork), [x, layer.weight, layer.bias]
        return join(other, x, None, nhwc=True, fork=fork), [other, x]
    (y1, y2), inputs = outputs(layers[0], True)
    assert y1.shape == y2.shape == list(shape) and np.array_equal(y1.astype("float32").numpy(), y2.astype("float32").numpy())
    got = paddle.grad([y1, y2], inputs, [g1, g2])
    y, inputs = outputs(layers[1], False)
    want = paddle.grad([y], inputs, [(g1.astype("float32") + g2.astype("float32")).astype(dtype)])
    for a, b in zip(got, want):
        a, b = a.astype("float32").numpy(), b.astype("float32").numpy()
        if dtype == "float32":
            np.testing.assert_array_equal(a, b)
        else:
            assert relative(a, b) <= 1e-2
    (y1, _), inputs = outputs(layers[2], True)
    alone = paddle.grad([y1], inputs, [g1])
    y, inputs = outputs(layers[1], False)
    for a, b in zip(alone, paddle.grad([y], inputs, [g1])):
        np.testing.assert_array_equal(a.astype("float32").numpy(), b.astype("float32").numpy())


@needs_op
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(4, 8, 8, 64), (4, 4, 4, 512)])  # ResNet-20's and ResNet-18's last maps, NHWC
def test_mean_pool_is_the_fp32_mean_and_its_gradient(shape, dtype):
    """The pooled features [N, C] in float32 (for the classifier and the loss) and the
    gradient g / (h * w) back in the activations' type: against Paddle's mean, its gradient
    rounded to the nearest even (Paddle 2.6's own cast to bf16 truncates)."""
    rng = np.random.default_rng(sum(shape))
    x = paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32) + 0.5).astype(dtype)
    x.stop_gradient = False
    grad = paddle.to_tensor(rng.standard_normal(shape[::3], dtype=np.float32))
    y = mean_pool(x)
    x32 = paddle.to_tensor(x.astype("float32").numpy(), stop_gradient=False)
    ref = x32.mean(axis=[1, 2])
    assert y.dtype == paddle.float32 and y.shape == [shape[0], shape[3]]
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
    got, want = paddle.grad([y], [x], [grad])[0], paddle.grad([ref], [x32], [grad])[0].numpy()
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got.astype("float32").numpy(), want if dtype == "float32" else nearest_bf16(want))


@needs_op
def test_frozen_batch_norm_keeps_paddles_kernel_and_its_statistics():
    layer = paddle.nn.BatchNorm2D(4)
    layer._use_global_stats = True  # finetune.py's last/head strategies
    x = paddle.rand([2, 4, 5, 5])
    before = layer._mean.numpy().copy()
    np.testing.assert_array_equal(batch_norm(layer, x).numpy(), paddle.nn.BatchNorm2D.forward(layer, x).numpy())
    np.testing.assert_array_equal(layer._mean.numpy(), before)


@needs_op
def test_uncovered_layers_keep_paddles_kernel():
    kept = [models.Conv2D(4, 4, 3, bias_attr=True), models.Conv2D(4, 4, 3, groups=2),
            models.Conv2D(4, 4, 3, dilation=2), models.Conv2D(4, 4, (1, 3)),
            models.Conv2D(4, 4, 3, data_format="NHWC"), models.Conv2D(4, 4, 3, padding="SAME"),
            paddle.nn.Conv2D(4, 4, 3, bias_attr=False)]  # Paddle's own layer: not one of ours
    assert [cpu_kernels.covered(c) for c in kept] == [False] * len(kept)
    assert cpu_kernels.covered(models.Conv2D(4, 4, 3, stride=2, padding=1, bias_attr=False))
    assert cpu_kernels.use_in(paddle.nn.Sequential(*kept))["conv"] == 0
    assert all(c.kernel is None for c in kept[:-1])


@needs_op
def test_model_outputs_and_names_are_unchanged_by_the_switch():
    paddle.seed(0)
    model = models.resnet20()
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32))
    model.eval()
    before, names = model(x).numpy(), list(model.state_dict())
    assert cpu_kernels.use_in(model) == dict(conv=19, norm=19, join=9, pool=1, entry=1, layout="nhwc", dtype="float32")
    after = model(x).numpy()
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)
    assert list(model.state_dict()) == names


# Every kind of network of models/, on our kernels against Paddle's: (name, stem, image
# size). The ImageNet stem at 64 pixels keeps Paddle's kernels quick; its last stage is
# still 2x2. ResNet-56, plain-56 and ResNet-34 are left out: their layers are those of
# ResNet-20/110, plain-20 and ResNet-18 in other numbers (their shapes are in SHAPES),
# and they took about 15 s of each of CI's two suites with the operators. fast_plain9 is
# fast_resnet9 without its joins: its layers are there.
NETWORKS = [("resnet20", "cifar", 32), ("resnet110", "cifar", 32), ("plain20", "cifar", 32),
            ("resnet18", "cifar", 32), ("resnet18", "imagenet", 64),
            ("resnet50", "cifar", 32),
            # its layers are resnet50-cifar's and resnet18-imagenet's: Paddle 2.6's suite leaves it
            pytest.param("resnet50", "imagenet", 64, marks=once_with_the_operators),
            ("fast_resnet", "cifar", 32), ("fast_plain", "cifar", 32), ("fast_resnet_small", "cifar", 32),
            ("fast_resnet9", "cifar", 32)]


def network(name, stem, weights=lambda a: a):
    """``name`` with seeded weights, and BatchNorm statistics, scales and shifts that are not
    their initial 0/1 (evaluation then tests them too); ``weights`` maps every weight."""
    paddle.seed(0)
    model = models.get_model(name, num_classes=10, stem=stem)
    rng = np.random.default_rng(1)
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            c = layer.weight.shape[0]
            layer._mean.set_value(rng.standard_normal(c).astype(np.float32) * 0.1)
            layer._variance.set_value((1 + rng.random(c)).astype(np.float32))
            layer.weight.set_value((0.5 + rng.random(c)).astype(np.float32))
            layer.bias.set_value(rng.standard_normal(c).astype(np.float32) * 0.1)
    for p in model.parameters():
        p.set_value(weights(p.numpy()))
    return model


def logits_and_gradients(model, x, y, training):
    """The logits and every parameter's gradient of one cross-entropy step. (In evaluation
    Paddle's batch_norm gives a frozen scale's shift no gradient: those are left out.)"""
    model.train() if training else model.eval()
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if not p.stop_gradient and p.grad is not None}
    return logits.numpy(), grads


def gradient_distance(a, b):
    """||a - b|| / ||b|| over every gradient together (b: the reference)."""
    return np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in b)) / np.sqrt(sum((b[k] ** 2).sum() for k in b))


@needs_op
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,stem,size", NETWORKS)
def test_every_network_on_our_kernels_is_paddles_to_rounding(name, stem, size, training):
    """The logits and every parameter's gradient of each network of models/, on our kernels
    against Paddle's, with the yardstick of the training-distance test: a change of
    rounding's size. fp32: the weights scaled by 1 + 1e-6; ours may be twice as far from
    Paddle's as that (||a - b|| / ||b||, all gradients together and each parameter's), with
    a floor of 1e-2 for all and 5e-2 for one: a ReLU whose input rounds to the other side
    of zero moves the gradients behind it (measured: 2.6e-3 for all, 5.6e-3 for one, on
    ResNet-34 at batch 4, where the nudge moved them 6e-6), a wrong kernel by O(1). bf16 (on a CPU with bf16 units):
    the yardstick is Paddle's fp32 with its weights and images rounded to bf16 once; ours
    rounds every activation, and was measured at 1.0-1.44x it for the gradients and 1.0-2.3x
    for the logits (AMD EPYC): allowed 2.5x and 4x. In evaluation bf16 runs in fp32, and
    with bf16_eval (--amp-eval) in bf16, held to the same yardstick as training's logits
    (measured at 0.47-2.2x it, AMD EPYC)."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((4, 3, size, size), dtype=np.float32)
    x, y = paddle.to_tensor(images), paddle.to_tensor(rng.integers(0, 10, 4))
    want_logits, want = logits_and_gradients(network(name, stem), x, y, training)
    assert all(np.abs(g).sum() > 0 for g in want.values())  # every parameter has a gradient to compare

    nudged_logits, nudged = logits_and_gradients(network(name, stem, lambda a: a * (1 + 1e-6)), x, y, training)
    model = network(name, stem)
    cpu_kernels.use_in(model)
    logits, got = logits_and_gradients(model, x, y, training)
    assert got.keys() == want.keys()
    assert relative(logits, want_logits) <= max(2 * relative(nudged_logits, want_logits), 1e-4)
    assert gradient_distance(got, want) <= max(2 * gradient_distance(nudged, want), 1e-2)
    for k in want:
        assert gradient_distance({k: got[k]}, {k: want[k]}) <= max(2 * gradient_distance({k: nudged[k]}, {k: want[k]}),
                                                                   5e-2), k

    if BF16_UNITS is None:
        return
    model = network(name, stem)
    cpu_kernels.use_in(model, dtype="bfloat16")
    logits16, got16 = logits_and_gradients(model, x, y, training)
    rounded_model = network(name, stem, round_to_bf16)
    if not training:  # evaluation runs in fp32: as the fp32 kernels, to the bit
        np.testing.assert_array_equal(logits16, logits)
        cpu_kernels.use_in(model, dtype="bfloat16", bf16_eval=True)  # and with --amp-eval in bf16
        rounded_model.eval()  # (2.6's eval() returns None)
        with paddle.no_grad():  # as evaluate() runs: BatchNorm on the operator's inference pass
            evaluated = model(x).numpy()
            rounded_logits = rounded_model(paddle.to_tensor(round_to_bf16(images))).numpy()
        assert not np.array_equal(evaluated, logits)
        assert relative(evaluated, want_logits) <= 4 * relative(rounded_logits, want_logits)
        return
    rounded_logits, rounded = logits_and_gradients(rounded_model, paddle.to_tensor(round_to_bf16(images)), y, training)
    assert gradient_distance(got16, want) <= 2.5 * gradient_distance(rounded, want)
    assert relative(logits16, want_logits) <= 4 * relative(rounded_logits, want_logits)


def train_steps(conv, steps=8, nudge=0.0):
    """ResNet-20 after ``steps`` SGD steps (lr 0.1, momentum 0.9) on fixed random batches:
    its weights, and the gradients of the first step."""
    rng = np.random.default_rng(0)
    paddle.seed(0)
    model = models.resnet20()
    if conv == "onednn":
        cpu_kernels.use_in(model)
    for p in model.parameters():
        p.set_value(p * (1 + nudge))
    opt = paddle.optimizer.Momentum(0.1, momentum=0.9, parameters=model.parameters(), weight_decay=5e-4)
    first = None
    for step in range(steps):
        x = paddle.to_tensor(rng.standard_normal((40, 3, 32, 32), dtype=np.float32))
        F.cross_entropy(model(x), paddle.to_tensor(rng.integers(0, 10, 40))).backward()
        if first is None:
            first = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.clear_grad()
    return {n: p.numpy() for n, p in model.named_parameters()}, first


def relative_distance(a, b):
    """||a - b|| / ||a|| over all tensors together."""
    return np.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)) / np.sqrt(sum((a[k] ** 2).sum() for k in a))


@needs_op
def test_training_steps_match_paddles_within_what_rounding_does():
    """The tolerance, justified: the two kernels sum in different orders, so they differ by
    rounding, and training at lr 0.1 amplifies any difference. The yardstick is a change of
    the same size as rounding: every initial weight scaled by 1 + 1e-6. Measured here, the
    whole model's first gradients differ by 8e-4 (oneDNN) against 2.3e-3 (the nudge), the
    weights after 8 steps by 0.023 against 0.025. So: the oneDNN run may be at most twice as
    far from Paddle's as the nudged run is; a wrong gradient would be orders beyond it."""
    paddle_w, paddle_g = train_steps("paddle")
    onednn_w, onednn_g = train_steps("onednn")
    nudged_w, nudged_g = train_steps("paddle", nudge=1e-6)
    assert relative_distance(paddle_g, onednn_g) <= 2 * relative_distance(paddle_g, nudged_g)
    assert relative_distance(paddle_w, onednn_w) <= 2 * relative_distance(paddle_w, nudged_w)
    assert relative_distance(paddle_w, nudged_w) < 0.1  # the yardstick itself is small


FAST = ["--model", "resnet20", "--epochs", "2", "--batch-size", "40", "--val-size", "40",
        "--num-workers", "0", "--log-every", "100"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_cifar_archive(tmp_path_factory.mktemp("data") / "cifar-10-python.tar.gz", n_train=200, n_test=60)


@needs_op
def test_the_switch_in_a_training_run(archive, tmp_path, capsys):
    """--cpu-kernels ours (the default) runs our kernels in train_cifar10.py and says so;
    --cpu-kernels paddle does not, nor does the old spelling --conv paddle; the runs learn
    alike (the per-step agreement is tested above)."""
    results = {}
    for kernels_flag in (["--cpu-kernels", "paddle"], ["--conv", "paddle"], []):
        out = tmp_path / ("-".join(kernels_flag) or "default")
        train_cifar10.main(FAST + ["--data-file", archive, "--output-dir", str(out)] + kernels_flag)
        result = yaml.safe_load(open(out / "results.yaml"))
        log = capsys.readouterr().out
        ours = not kernels_flag
        assert ("CPU kernels: ours (cpu_kernels/" in log and "convolutions 19, BatchNorm(+activation) 19, residual joins 9"
                in log) == ours
        assert result["cpu_kernels"] == ("ours" if ours else "paddle")
        results["ours" if ours else "paddle"] = result
    losses = [results[c]["final_train_loss"] for c in ("paddle", "ours")]
    assert abs(losses[0] - losses[1]) <= 0.02 * losses[0], losses


def test_without_headers_training_falls_back_with_one_notice(archive, tmp_path, monkeypatch, capsys):
    def no_headers(library):
        raise cpu_kernels.Unavailable("no oneDNN headers <= 3.2.1 found: pip install onednn-devel-cpu-gomp==2023.2.0")
    monkeypatch.setattr(build, "find_headers", no_headers)
    monkeypatch.setattr(build, "loaded", {})
    train_cifar10.main(FAST + ["--epochs", "1", "--data-file", archive, "--output-dir", str(tmp_path)])
    log = capsys.readouterr().out
    assert "notice: training on Paddle's kernels (no oneDNN headers <= 3.2.1 found: pip install" in log
    assert yaml.safe_load(open(tmp_path / "results.yaml"))["cpu_kernels"] == "paddle"


@needs_op
def test_a_compile_error_is_one_line_pointing_to_the_log(tmp_path, monkeypatch):
    broken = tmp_path / "conv.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(build, "SOURCES", [str(broken)])
    monkeypatch.setenv("CPU_KERNELS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cpu_kernels.Unavailable, match="did not compile; the compiler's output is in .*build.log"):
        build.compile_op()
    log = next((tmp_path / "cache").glob("*/build.log")).read_text()
    assert "error" in log


@needs_op
def test_a_failing_self_check_is_a_reason_not_a_crash(monkeypatch):
    def broken(op):
        raise RuntimeError("oneDNN said no\nmore lines")
    monkeypatch.setattr(build, "self_check", broken)
    monkeypatch.setattr(build, "loaded", {})
    assert cpu_kernels.load() == (None, "the operator failed its start-up check (RuntimeError: oneDNN said no)")


@needs_op
def test_the_self_check_refuses_a_batch_norm_whose_running_mean_stays():
    """BatchNorm writes the running statistics through its inputs: were Paddle ever to
    hand the kernel copies, training would run with statistics that never move. The
    start-up check says so instead (and the operator falls back)."""
    class Copying:
        onednn_conv2d = staticmethod(OP.onednn_conv2d)

        @staticmethod
        def batch_norm_act(x, scale, shift, mean, variance, *attrs):
            return OP.batch_norm_act(x, scale, shift, mean.clone(), variance.clone(), *attrs)
    with pytest.raises(cpu_kernels.Unavailable, match="did not update the running mean"):
        build.self_check(Copying)
    build.self_check(OP)


# ------------------------------------------------------------------------ bf16 (NHWC)
import device as devices  # noqa: E402

BF16_UNITS = devices.cpu_bf16_units(devices.cpu_flags())
needs_bf16 = pytest.mark.skipif(OP is None or BF16_UNITS is None, reason="needs the operator and a CPU with bf16 units")


def nearest_bf16(a):
    """float32 values rounded to the nearest bfloat16, ties to the even one (as float32):
    the rounding oneDNN and PyTorch make, whatever Paddle's cast does (2.6's truncates)."""
    a = np.asarray(a, np.float32)
    down = (a.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # toward zero
    up = (down.view(np.uint32) + np.uint32(0x10000)).view(np.float32)  # the next one away from zero
    below, above = np.abs(a.astype(np.float64) - down), np.abs(up.astype(np.float64) - a)
    even = (down.view(np.uint32) & np.uint32(0x10000)) == 0
    return np.where((below < above) | ((below == above) & even), down, up)


@needs_op
def test_the_bf16_cast_rounds_to_the_nearest_even_and_its_gradient_too():
    """The casts around the bf16 operators (the image batch, a frozen BatchNorm): narrowing
    rounds, ties to even, both ways; widening is exact."""
    ties = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-12]
    a = np.concatenate([np.float32(ties), np.random.default_rng(0).standard_normal(4096, dtype=np.float32) * 10])
    want = nearest_bf16(a)
    np.testing.assert_array_equal(want[:4], np.float32([1, 1 + 2**-6, -1, 1 + 2**-7]))  # the reference itself
    x = paddle.to_tensor(a, stop_gradient=False)
    y = OP.bf16_cast(x)
    assert y.dtype == paddle.bfloat16
    np.testing.assert_array_equal(OP.bf16_cast(y).numpy(), want)
    g16 = OP.bf16_cast(paddle.to_tensor(a[::-1].copy()))
    np.testing.assert_array_equal(paddle.grad([y], [x], [g16])[0].numpy(), want[::-1])  # widened exactly
    x16 = OP.bf16_cast(paddle.to_tensor(a))
    x16.stop_gradient = False
    y32 = OP.bf16_cast(x16)
    assert y32.dtype == paddle.float32
    np.testing.assert_array_equal(OP.bf16_cast(paddle.grad([y32], [x16], [x])[0]).numpy(), want)


def bf16(t):
    """``t`` rounded to bf16 (and the bf16 tensor): the same values in both precisions."""
    b = paddle.to_tensor(t.numpy()).astype("bfloat16")
    b.stop_gradient = t.stop_gradient
    return b


@needs_bf16
@pytest.mark.parametrize("x_shape,w_shape,stride,padding", PER_MODEL["resnet20"] + PER_MODEL["resnet18_cifar"][:4])
def test_bf16_convolution_is_fp32s_to_bf16_rounding(x_shape, w_shape, stride, padding):
    """bf16 activations, fp32 weights (converted per call), an fp32 weight gradient: against
    fp32 on the same bf16-representable inputs, within bf16's rounding (measured at most
    ~5e-3 relative here; 2e-2 allowed: one bf16 ulp is 7.8e-3)."""
    rng = np.random.default_rng(sum(x_shape))
    x32 = paddle.to_tensor(rng.standard_normal(x_shape, dtype=np.float32).transpose(0, 2, 3, 1), stop_gradient=False)
    x16 = bf16(x32)
    x32 = paddle.to_tensor(x16.astype("float32").numpy(), stop_gradient=False)
    w = paddle.to_tensor(rng.standard_normal(w_shape, dtype=np.float32) * 0.1, stop_gradient=False)
    y16 = OP.onednn_conv2d(x16, w, stride, padding, True, True)
    y32 = OP.onednn_conv2d(x32, w, stride, padding, True, True)
    assert y16.dtype == paddle.bfloat16
    g = rng.standard_normal(y32.shape, dtype=np.float32)
    g16, g32 = bf16(paddle.to_tensor(g)), None
    g32 = g16.astype("float32")
    got = [y16, *paddle.grad([y16], [x16, w], [g16])]
    want = [y32, *paddle.grad([y32], [x32, w], [g32])]
    assert got[2].dtype == paddle.float32  # the weight gradient stays fp32
    for name, a, b in zip(("out", "grad x", "grad w"), got, want):
        assert relative(a.astype("float32").numpy(), b.numpy()) <= 2e-2, name


@needs_bf16
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
def test_bf16_batch_norm_keeps_fp32_statistics(act):
    rng = np.random.default_rng(1)
    shape = (8, 16, 16, 32)  # NHWC
    x16 = bf16(paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32) * 2 + 1, stop_gradient=False))
    x32 = paddle.to_tensor(x16.astype("float32").numpy(), stop_gradient=False)
    ours, theirs = paddle.nn.BatchNorm2D(32), paddle.nn.BatchNorm2D(32)
    y16 = batch_norm(ours, x16, act, nhwc=True)
    y32 = batch_norm(theirs, x32, act, nhwc=True)
    assert y16.dtype == paddle.bfloat16 and ours._mean.dtype == paddle.float32
    assert relative(ours._mean.numpy(), theirs._mean.numpy()) <= 1e-6  # statistics of the same values, in fp32
    assert relative(ours._variance.numpy(), theirs._variance.numpy()) <= 1e-5
    g = bf16(paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32)))
    got = [y16, *paddle.grad([y16], [x16, ours.weight, ours.bias], [g])]
    want = [y32, *paddle.grad([y32], [x32, theirs.weight, theirs.bias], [g.astype("float32")])]
    for name, a, b in zip(("out", "grad x", "grad scale", "grad shift"), got, want):
        assert relative(a.astype("float32").numpy(), b.numpy()) <= 2e-2, name


@needs_bf16
def test_bf16_frozen_batch_norm_runs_paddles_kernel_in_fp32():
    """Fine-tuning's last/head freeze BN statistics; Paddle's BN has no CPU bf16 kernel."""
    rng = np.random.default_rng(2)
    shape = (4, 8, 8, 16)  # NHWC
    x16 = bf16(paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32) * 2 + 1, stop_gradient=False))
    x32 = paddle.to_tensor(x16.astype("float32").numpy(), stop_gradient=False)
    layer = paddle.nn.BatchNorm2D(16, data_format="NHWC")
    layer._mean.set_value(paddle.full([16], 0.5))
    layer._variance.set_value(paddle.full([16], 3.0))
    layer._use_global_stats = True
    y16 = batch_norm(layer, x16, "relu", nhwc=True)
    y32 = paddle.nn.functional.relu(layer(x32))
    assert y16.dtype == paddle.bfloat16
    assert relative(y16.astype("float32").numpy(), y32.numpy()) <= 4e-3  # one bf16 rounding
    np.testing.assert_array_equal(layer._mean.numpy(), np.full(16, 0.5, np.float32))  # frozen
    g = bf16(paddle.to_tensor(rng.standard_normal(shape, dtype=np.float32)))
    (dx16,), (dx32,) = paddle.grad([y16], [x16], [g]), paddle.grad([y32], [x32], [g.astype("float32")])
    assert dx16.dtype == paddle.bfloat16 and relative(dx16.astype("float32").numpy(), dx32.numpy()) <= 4e-3


# (NHWC shape, (kernel, stride, padding)): the ImageNet stem's 3x3/2 (224, 32 and odd
# sizes), the fast networks' 2x2/2 (31 -> 15 drops the last row and column) and their 3x3/3
POOLS = [((2, 112, 112, 64), (3, 2, 1)), ((2, 16, 16, 64), (3, 2, 1)), ((2, 9, 9, 8), (3, 2, 1)),
         ((1, 7, 10, 3), (3, 2, 1)), ((2, 31, 31, 64), (2, 2, 0)), ((2, 15, 15, 256), (2, 2, 0)),
         ((2, 7, 7, 256), (2, 2, 0)), ((2, 3, 3, 256), (3, 3, 0)),
         ((2, 15, 15, 128), (2, 2, 0)), ((2, 7, 7, 128), (2, 2, 0)), ((2, 3, 3, 128), (3, 3, 0))]


@needs_op
@pytest.mark.parametrize("shape,window", POOLS)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_is_paddles_exactly(shape, window, ties):
    """Each window against F.max_pool2d, to the bit: ties (small integers) go to the first
    position of the window, as in Paddle's kernel."""
    rng = np.random.default_rng(3)
    a = rng.integers(-3, 3, shape).astype(np.float32) if ties else rng.standard_normal(shape, dtype=np.float32)
    x, ref_x = (paddle.to_tensor(a, stop_gradient=False) for _ in range(2))
    y, y2 = OP.max_pool(x, *window)
    ref = F.max_pool2d(ref_x, *window, data_format="NHWC")
    np.testing.assert_array_equal(y.numpy(), ref.numpy())
    g, g2 = (paddle.to_tensor(rng.standard_normal(ref.shape, dtype=np.float32)) for _ in range(2))
    np.testing.assert_array_equal(paddle.grad([y], [x], [g])[0].numpy(), paddle.grad([ref], [ref_x], [g])[0].numpy())
    y, y2 = OP.max_pool(x, *window)  # both outputs used: the gradients add
    ref = F.max_pool2d(ref_x, *window, data_format="NHWC")
    got = paddle.grad([y, y2], [x], [g, g2])[0].numpy()
    np.testing.assert_allclose(got, paddle.grad([ref], [ref_x], [g + g2])[0].numpy(), rtol=1e-6, atol=1e-6)


@needs_bf16
def test_bf16_max_pool_is_the_fp32_max_pool_rounded():
    rng = np.random.default_rng(3)
    x16 = bf16(paddle.to_tensor(rng.standard_normal((2, 16, 16, 64), dtype=np.float32), stop_gradient=False))
    x32 = paddle.to_tensor(x16.astype("float32").numpy(), stop_gradient=False)
    y16 = max_pool(x16, nhwc=True)
    y32 = F.max_pool2d(x32, 3, 2, 1, data_format="NHWC")
    assert y16.dtype == paddle.bfloat16 and y16.shape == [2, 8, 8, 64]
    np.testing.assert_array_equal(y16.astype("float32").numpy(), y32.numpy())  # a max of bf16 values is one
    g = bf16(paddle.to_tensor(rng.standard_normal((2, 8, 8, 64), dtype=np.float32)))
    (dx16,), (dx32,) = paddle.grad([y16], [x16], [g]), paddle.grad([y32], [x32], [g.astype("float32")])
    # summed in float where an input wins two overlapping windows, then rounded once
    np.testing.assert_array_equal(dx16.astype("float32").numpy(), nearest_bf16(dx32.numpy()))


@needs_bf16
def test_bf16_trains_an_imagenet_stem_and_bottleneck_resnet():
    for model in (models.resnet18(num_classes=3), models.resnet50(num_classes=3)):
        cpu_kernels.use_in(model, dtype="bfloat16")
        model.train()
        opt = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
        before = model.conv1.weight.numpy().copy()
        x = paddle.to_tensor(np.random.default_rng(4).standard_normal((2, 3, 32, 32), dtype=np.float32))
        loss = paddle.nn.functional.cross_entropy(model(x), paddle.to_tensor([0, 2]))
        loss.backward()
        opt.step()
        assert np.isfinite(float(loss)) and not np.array_equal(model.conv1.weight.numpy(), before)


@needs_bf16
@pytest.mark.parametrize("out_shape,in_shape,stride", [((4, 16, 16, 32), (4, 32, 32, 16), 2), ((4, 8, 8, 64), (4, 8, 8, 64), 1)])
def test_bf16_join_is_the_fp32_join_rounded(out_shape, in_shape, stride):
    rng = np.random.default_rng(2)
    out16 = bf16(paddle.to_tensor(rng.standard_normal(out_shape, dtype=np.float32), stop_gradient=False))
    x16 = bf16(paddle.to_tensor(rng.standard_normal(in_shape, dtype=np.float32), stop_gradient=False))
    out32 = paddle.to_tensor(out16.astype("float32").numpy(), stop_gradient=False)
    x32 = paddle.to_tensor(x16.astype("float32").numpy(), stop_gradient=False)
    shortcut = models.ResidualJoin(stride, out_shape[3] - in_shape[3]) if stride > 1 else None
    y16 = join(out16, x16, shortcut, nhwc=True)
    y32 = join(out32, x32, shortcut, nhwc=True)
    g = bf16(paddle.to_tensor(rng.standard_normal(out_shape, dtype=np.float32)))
    got = [y16, *paddle.grad([y16], [out16, x16], [g])]
    want = [y32, *paddle.grad([y32], [out32, x32], [g.astype("float32")])]
    for a, b in zip(got, want):  # one rounding (to nearest even) of the same fp32 sum: equal to the bit
        np.testing.assert_array_equal(a.astype("float32").numpy(), round_to_bf16(b.numpy()))


@needs_op
@pytest.mark.parametrize("slower", [True, False])
def test_bf16_training_says_so_where_bf16_is_slower_than_fp32(slower, capsys):
    import config
    import train_net
    plan = dict(cpu_bf16="AVX512-BF16", cpu_bf16_slower=slower)  # device.training_plan's, for any CPU
    assert train_net.choose_kernels(models.get_model("fast_resnet_small"), config.make_config({}), "cpu", plan) == "ours"
    log = capsys.readouterr().out
    assert "mixed precision: bf16 on AVX512-BF16" in log
    assert (f"notice: {devices.SLOW_BF16}; drop --amp to train in fp32" in log) is slower


def round_to_bf16(x):
    """float32 -> the nearest bf16 value (ties to even), as float32 (Paddle 2.6's own cast truncates)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


@needs_bf16
def test_bf16_training_logs_its_units_saves_fp32_and_resumes_exactly(archive, tmp_path, capsys, monkeypatch):
    from helpers import interrupt_in_epoch
    import checkpoint
    import engine
    args = FAST + ["--data-file", archive, "--amp", "--amp-dtype", "bfloat16", "--amp-eval"]
    train_cifar10.main(args + ["--output-dir", str(tmp_path / "a")])
    log = capsys.readouterr().out
    assert f"mixed precision: bf16 on {BF16_UNITS}" in log and "evaluation bf16)" in log
    assert "evaluated in bf16): test acc" in log
    assert (devices.SLOW_BF16 in log) is devices.bf16_slower_than_fp32(devices.cpu_flags(), devices.cpu_info("vendor_id"))
    a = checkpoint.load(str(tmp_path / "a" / "last.pdckpt"))
    assert all(np.asarray(v).dtype == np.float32 for k, v in a["model"].items())
    results = yaml.safe_load(open(tmp_path / "a" / "results.yaml"))
    assert np.isfinite(results["final_train_loss"])
    again = eval_script.main(["--ckpt", str(tmp_path / "a" / "last.pdckpt"), "--num-workers", "0", "--json",
                              "--batch-size", "40", "--precision", "bf16"])  # eval.py's bf16: the run's own figure
    assert again["precision"] == "bf16" and again["top1"] == results["final_test_acc"]
    original = engine.train_one_epoch
    monkeypatch.setattr(engine, "train_one_epoch", interrupt_in_epoch(original, 1, 2))
    with pytest.raises(SystemExit):
        train_cifar10.main(args + ["--output-dir", str(tmp_path / "b")])
    monkeypatch.setattr(engine, "train_one_epoch", original)
    train_cifar10.main(["--resume", str(tmp_path / "b")])
    b = checkpoint.load(str(tmp_path / "b" / "last.pdckpt"))
    for k in a["model"]:  # bit-exact on the same machine
        np.testing.assert_array_equal(np.asarray(a["model"][k]), np.asarray(b["model"][k]), err_msg=k)


@needs_bf16
def test_a_fresh_copy_computing_like_the_trained_model_gives_its_logits_to_the_bit():
    """The best checkpoint's model, built afresh for the final report, is evaluated on the
    trained model's kernels, layout and dtype (train_net.computing_like)."""
    import train_net
    paddle.seed(0)
    trained = models.resnet20()
    cpu_kernels.use_in(trained, dtype="bfloat16", bf16_eval=True)
    fresh = models.resnet20()
    fresh.set_state_dict(trained.state_dict())
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32))
    trained.eval()
    fresh.eval()
    with paddle.no_grad():
        want, on_paddles = trained(x).numpy(), fresh(x).numpy()
        got = train_net.computing_like(fresh, trained)(x).numpy()
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(on_paddles, want)  # fp32 on Paddle's kernels: not what it was trained to compute


@needs_op
def test_a_second_use_in_sets_every_kernel_anew():
    model = models.resnet18(num_classes=3)
    cpu_kernels.use_in(model)  # NHWC: the pools and the entry take kernels
    assert model.maxpool.kernel is not None and model.avgpool.kernel is not None
    assert cpu_kernels.use_in(model, layout="nchw")["layout"] == "nchw"
    assert model.maxpool.kernel is None and model.avgpool.kernel is None and model.entry.kernel is None
    assert model.bn1.kernel is not None and not model.bn1.fork
