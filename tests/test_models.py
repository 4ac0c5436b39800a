import numpy as np
import paddle
import pytest

import models
from models import BottleneckBlock, ConvBNLayer, ResidualBlock, get_model, load_weights
from models.summary import summary
from models.weights import WeightsMismatchError

from helpers import kernel_free

pytestmark = kernel_free  # the networks on Paddle's own ops: alike in both Paddle 2.6 suites


def trainable(model):
    return sum(int(np.prod(p.shape)) for p in model.parameters() if not p.stop_gradient)


# (trainable params, MACs) for the ImageNet models at 224 and the CIFAR-stem models at 32.
IMAGENET = {
    "resnet18": (11_689_512, 1_814_073_344),
    "resnet34": (21_797_672, 3_663_761_408),
    "resnet50": (25_557_032, 4_089_184_256),
    "resnet101": (44_549_160, 7_801_405_440),
    "resnet152": (60_192_808, 11_513_626_624),
}
CIFAR_STEM = {
    "resnet18": (11_173_962, 555_422_720),
    "resnet34": (21_282_122, 1_159_402_496),
    "resnet50": (23_520_842, 1_297_829_888),
    "resnet101": (42_512_970, 2_509_983_744),
    "resnet152": (58_156_618, 3_722_137_600),
}
PAPER = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
         "resnet56": 853_018, "resnet110": 1_727_962}


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_counts(name):
    result = summary(get_model(name), 224, print_fn=None)
    assert (result["trainable_params"], result["macs"]) == IMAGENET[name]


@pytest.mark.parametrize("name", CIFAR_STEM)
def test_cifar_stem_counts(name):
    result = summary(get_model(name, num_classes=10, stem="cifar"), 32, print_fn=None)
    assert (result["trainable_params"], result["macs"]) == CIFAR_STEM[name]


@pytest.mark.parametrize("name", PAPER)
def test_paper_cifar_counts(name):
    depth = int(name[len("resnet"):])
    assert trainable(get_model(name)) == PAPER[name]
    assert trainable(get_model(f"plain{depth}")) == PAPER[name]  # option A has no parameters


def test_paper_macs():
    assert summary(get_model("resnet20"), 32, print_fn=None)["macs"] == 40_551_040
    assert summary(get_model("resnet56"), 32, print_fn=None)["macs"] == 125_485_696
    assert summary(get_model("plain56"), 32, print_fn=None)["macs"] == 125_485_696


def test_resnext_and_wide_counts():
    # torchvision's published counts for the same architectures
    assert trainable(get_model("resnext50_32x4d")) == 25_028_904
    assert trainable(get_model("wide_resnet50_2")) == 68_883_240


def test_vgg16_summary():
    from models.summary import build
    result = summary(build("vgg16"), 224, print_fn=None)
    assert (result["trainable_params"], result["macs"]) == (138_357_544, 15_470_264_320)


def test_summary_cli_prints_totals(capsys):
    from models.summary import main
    main(["resnet20", "--input-size", "32"])
    out = capsys.readouterr().out
    assert "Trainable params: 269722" in out and "MACs: 40551040" in out
    assert "layer3.0.join" in out and "ResidualJoin" in out  # option A: inside the join


@pytest.mark.parametrize("name,size,stem", [("resnet18", 224, "imagenet"), ("resnet50", 224, "imagenet"),
                                            ("resnet18", 32, "cifar"), ("resnet50", 32, "cifar")])
def test_output_shapes(name, size, stem):
    model = get_model(name, num_classes=7, stem=stem)
    model.eval()
    assert model(paddle.rand([2, 3, size, size])).shape == [2, 7]


def test_paper_net_shapes():
    for name in ("resnet20", "plain20"):
        assert get_model(name)(paddle.rand([2, 3, 32, 32])).shape == [2, 10]


def test_feature_extractor_modes():
    x = paddle.rand([2, 3, 64, 64])
    assert models.resnet50(num_classes=0)(x).shape == [2, 2048, 1, 1]
    assert models.resnet50(num_classes=0, with_pool=False)(x).shape == [2, 2048, 2, 2]
    assert models.resnet18(num_classes=0).num_features == 512


def test_blocks_and_layer_shapes():
    x = paddle.rand([2, 16, 8, 8])
    assert ConvBNLayer(16, 32, 3, stride=2, act="relu")(x).shape == [2, 32, 4, 4]
    assert ResidualBlock(16, 32, stride=2)(x).shape == [2, 32, 4, 4]
    assert ResidualBlock(16, 32, stride=2, shortcut="A")(x).shape == [2, 32, 4, 4]
    assert BottleneckBlock(16, 8, stride=2)(x).shape == [2, 32, 4, 4]
    assert models.BasicBlock is ResidualBlock


def test_option_a_shortcut_is_subsample_plus_zeros():
    x = paddle.rand([1, 4, 6, 6])
    y = models.ResidualJoin(stride=2, extra=4).option_a(x).numpy()
    np.testing.assert_array_equal(y[:, :4], x.numpy()[:, :, ::2, ::2])
    assert not y[:, 4:].any()


def test_plain_block_has_no_shortcut():
    block = ResidualBlock(8, 8, shortcut=None)
    block.eval()
    x = paddle.rand([1, 8, 4, 4])
    out = block(x)
    bn, relu = paddle.nn.BatchNorm2D.forward, paddle.nn.functional.relu  # BN alone, then its ReLU
    expected = relu(bn(block.bn2, block.conv2(relu(bn(block.bn1, block.conv1(x))))))
    assert block.join is None and block.downsample is None
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-6)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid: .*resnet18.*plain110"):
        get_model("resnet19")


@pytest.mark.parametrize("ours,theirs", [("resnet18", "resnet18"), ("resnet50", "resnet50")])
def test_loads_paddle_vision_weights_and_matches(ours, theirs):
    import paddle.vision.models as pvm
    paddle.seed(0)
    ref = getattr(pvm, theirs)()
    model = get_model(ours)
    # BN running statistics are zeros/ones at init: give them values so they are tested too
    state = {k: (v + paddle.rand(v.shape) if k.endswith(("_mean", "_variance")) else v)
             for k, v in ref.state_dict().items()}
    ref.set_state_dict(state)
    assert set(model.state_dict()) == set(state)
    assert len(load_weights(model, state)) == len(state)
    ref.eval()
    model.eval()
    x = paddle.rand([2, 3, 224, 224])
    np.testing.assert_allclose(model(x).numpy(), ref(x).numpy(), atol=1e-5, rtol=1e-5)


def test_every_parameter_gets_a_gradient():
    for model in (models.resnet18(num_classes=10, stem="cifar"), models.resnet50(num_classes=10, stem="cifar"),
                  models.resnet20(), models.plain20()):
        loss = model(paddle.rand([2, 3, 32, 32])).mean()
        loss.backward()
        for name, p in model.named_parameters():
            if not p.stop_gradient:
                assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


@pytest.mark.parametrize("block,out", [(ResidualBlock, 16), (BottleneckBlock, 64)])
@pytest.mark.parametrize("stride", [1, 2])
def test_zero_init_residual_block_is_relu_of_shortcut(block, out, stride):
    model = models.ResNet(block, (1, 1), widths=(16, 16), stem="cifar", zero_init_residual=True)
    for blk in (model.layer1[0], model.layer2[0]):
        blk.eval()
        x = paddle.rand([2, blk.conv1.weight.shape[1], 8, 8])
        shortcut = x if blk.downsample is None else blk.downsample(x)
        np.testing.assert_allclose(blk(x).numpy(), paddle.nn.functional.relu(shortcut).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="plain"):
        models.ResNet(block, (1,), widths=(16,), shortcut=None, zero_init_residual=True)


def test_loader_rejects_wrong_depth_and_lists_keys():
    state = models.resnet34().state_dict()
    with pytest.raises(WeightsMismatchError, match=r"unexpected \d+: layer1.2.bn1._mean"):
        load_weights(models.resnet18(), state)
    with pytest.raises(WeightsMismatchError, match="missing .*layer1.0.conv3.weight"):
        load_weights(models.resnet50(), models.resnet18().state_dict())


def test_loader_classifier_option():
    state = models.resnet18(num_classes=10, stem="cifar").state_dict()
    model = models.resnet18(num_classes=5, stem="cifar")
    with pytest.raises(WeightsMismatchError, match="wrong shape 2: fc.bias: model \\[5\\], weights \\[10\\]"
                       ".*other classes\\? pass skip_classifier=True"):
        load_weights(model, state)
    fc_before = model.fc.weight.numpy().copy()
    loaded = load_weights(model, state, skip_classifier=True)
    assert "fc.weight" not in loaded
    np.testing.assert_array_equal(model.fc.weight.numpy(), fc_before)
    np.testing.assert_array_equal(model.conv1.weight.numpy(), state["conv1.weight"].numpy())


def test_loader_names_the_stem_of_weights_that_have_the_other_one():
    imagenet = models.resnet18(num_classes=10).state_dict()
    with pytest.raises(WeightsMismatchError, match=r'the weights have a 7x7 stem and the model a 3x3 one: build '
                                                   r'the model with stem="imagenet"\)$') as error:
        load_weights(models.resnet18(num_classes=10, stem="cifar"), imagenet, skip_classifier=True)
    assert "skip_classifier" not in str(error.value)
    with pytest.raises(WeightsMismatchError, match=r'build the model with stem="cifar"'):
        load_weights(models.resnet18(num_classes=10), models.resnet18(num_classes=10, stem="cifar").state_dict())


def test_every_factory_takes_stem_and_paper_nets_have_only_the_cifar_one():
    for name in models.MODELS:
        if name.startswith(("resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "plain")):
            assert get_model(name, stem="cifar") is not None
            with pytest.raises(ValueError, match="only the CIFAR stem"):
                get_model(name, stem="imagenet")
