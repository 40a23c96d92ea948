"""Model registry, checkpoint reading (safely), weight loading errors, target-layer resolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cfdebug.config import ModelConfig
from cfdebug.errors import CfdebugError
from cfdebug.hooks import capture, count_hooks
from cfdebug.models import DemoCNN, build_model, load_model, load_weights, read_state_dict, resolve_target


def _same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The torchvision forwards here are tiny; on a shared 2-core box intra-op threads only add
    barrier waits (DenseNet at 64 px: seconds instead of ~0.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def demo():
    torch.manual_seed(0)
    return DemoCNN(num_classes=3, width=4).eval()


# ---------------------------------------------------------------- building


@pytest.mark.parametrize("name", ["demo-cnn", "resnet18"])
def test_build_model_has_k_outputs(name):
    torch.manual_seed(0)
    model = build_model(name, 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_unknown_model_suggests_close_names():
    with pytest.raises(CfdebugError) as err:
        build_model("resnet-18", 10)
    message = str(err.value)
    assert "'resnet-18'" in message and "resnet18" in message.split("Did you mean", 1)[1]


def test_unknown_model_without_close_match():
    with pytest.raises(CfdebugError, match="Unknown model") as err:
        build_model("zzzzqqq", 10)
    assert "Did you mean" not in str(err.value)


# ---------------------------------------------------------------- reading checkpoints


def test_read_plain_state_dict(tmp_path, demo):
    path = tmp_path / "plain.pt"
    torch.save(demo.state_dict(), path)
    _same_state(read_state_dict(path), demo.state_dict())


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_read_nested_state_dict(tmp_path, demo, key):
    path = tmp_path / "nested.pt"
    torch.save({key: demo.state_dict(), "epoch": 3, "best_acc": 0.5}, path)
    _same_state(read_state_dict(path), demo.state_dict())


def test_read_module_prefixed_state_dict(tmp_path, demo):
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in demo.state_dict().items()}}, path)
    state = read_state_dict(path)
    _same_state(state, demo.state_dict())
    fresh = DemoCNN(num_classes=3, width=4)
    load_weights(fresh, state)
    _same_state(fresh.state_dict(), demo.state_dict())


def test_read_torchscript(tmp_path, demo):
    path = tmp_path / "scripted.pt"
    torch.jit.trace(demo, torch.randn(1, 3, 16, 16)).save(str(path))
    state = read_state_dict(path)
    _same_state(state, demo.state_dict())


def test_torchscript_loads_into_same_architecture(tmp_path):
    torch.manual_seed(1)
    source = DemoCNN(num_classes=3).eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(source).save(str(path))
    model = load_model(ModelConfig(name="demo-cnn", weights=str(path)), 3)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert not model.training


class _Evil:
    """Unpickling this would create a file: the payload a safe loader must never run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_refused(tmp_path, demo):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": demo.state_dict(), "extra": _Evil(marker)}, path)
    with pytest.raises(CfdebugError, match="Refusing") as err:
        read_state_dict(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    with pytest.raises(CfdebugError, match="Refusing"):
        load_model(ModelConfig(name="demo-cnn", weights=str(path)), 3)
    assert not marker.exists()
    # the payload is live: an unsafe load would have created the file
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(CfdebugError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CfdebugError, match="garbage.pt"):
        read_state_dict(garbage)
    not_tensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_tensors)
    with pytest.raises(CfdebugError, match="not a state_dict"):
        read_state_dict(not_tensors)


# ---------------------------------------------------------------- fitting weights


def test_class_count_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "ten.pt"
    torch.save(DemoCNN(num_classes=10).state_dict(), path)
    with pytest.raises(CfdebugError) as err:
        load_model(ModelConfig(name="demo-cnn", weights=str(path)), 3)
    message = str(err.value)
    assert "classifier.weight" in message and "classifier.bias" in message
    assert "(10, 64)" in message and "(3, 64)" in message
    assert "(10,)" in message and "(3,)" in message


def test_other_architecture_names_missing_and_unexpected_keys():
    resnet_state = build_model("resnet18", 10).state_dict()
    model = DemoCNN(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CfdebugError) as err:
        load_weights(model, resnet_state, "Checkpoint r18.pt")
    message = str(err.value)
    assert "Checkpoint r18.pt" in message
    assert "missing keys" in message and "features.0.weight" in message
    assert "unexpected keys" in message and "conv1.weight" in message
    _same_state(model.state_dict(), before)  # nothing half-loaded


# ---------------------------------------------------------------- target layers


def _check_heads(model: nn.Module, layer: str | None = None, size: int = 64):
    """The captured target output fed through the heads reproduces the model's logits."""
    model.eval()
    target = resolve_target(model, layer)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad(), capture(model, target.name) as cap:
        logits = model(x)
    fmap = cap.activations[target.name]
    assert fmap.dim() == 4 and fmap.shape[1] == target.channels
    with torch.no_grad():
        torch.testing.assert_close(target.map_head(fmap), logits, atol=1e-4, rtol=1e-4)
        if target.pooled_head is not None:
            act = target.activation(fmap) if target.activation is not None else fmap
            torch.testing.assert_close(target.pooled_head(act.mean(dim=(2, 3))), logits, atol=1e-4, rtol=1e-4)
    assert count_hooks(model) == 0
    return target


def test_target_demo_cnn():
    torch.manual_seed(0)
    target = _check_heads(DemoCNN(num_classes=10), size=32)
    assert target.name == "features.19" and target.channels == 64 and target.activation is None


@pytest.mark.parametrize(
    "name, expected_layer, channels, has_pooled, has_activation",
    [
        ("resnet18", "layer4", 512, True, False),
        ("vgg11", "features.19", 512, False, False),
        ("densenet121", "features", 1024, True, True),
        ("mobilenet_v3_small", "features.12", 576, True, False),
        ("efficientnet_b0", "features.8", 1280, True, False),
        ("mobilenet_v2", "features.18", 1280, True, False),
    ],
)
def test_target_torchvision(name, expected_layer, channels, has_pooled, has_activation):
    torch.manual_seed(0)
    model = build_model(name, 5)
    if name == "vgg11":
        # shrink the 25088→4096 classifier so the test stays light; the head structure is the same
        model.classifier[0] = nn.Linear(512 * 7 * 7, 64)
        model.classifier[3] = nn.Linear(64, 64)
        model.classifier[6] = nn.Linear(64, 5)
    target = _check_heads(model)
    assert target.name == expected_layer
    assert target.channels == channels
    assert (target.pooled_head is not None) == has_pooled
    assert (target.activation is not None) == has_activation
    if name == "vgg11":
        assert isinstance(dict(model.named_modules())[target.name], nn.ReLU)
        assert not isinstance(list(model.features)[-1], nn.ReLU)  # the last ReLU, not the last module


def test_layer_override():
    torch.manual_seed(0)
    model = DemoCNN(num_classes=10).eval()
    target = resolve_target(model, "features.12")  # the ReLU at the end of block 2
    assert target.name == "features.12" and target.channels == 32
    assert target.pooled_head is None and target.map_head is None
    same = resolve_target(model, "features.19")  # naming the default keeps its heads
    assert same.pooled_head is model.classifier
    resnet = build_model("resnet18", 4).eval()
    t = resolve_target(resnet, "layer3.1.relu")  # no conv inside: channels found by a probe
    assert t.channels == 256
    assert count_hooks(resnet) == 0


def test_unknown_layer_name_errors():
    model = DemoCNN(num_classes=10)
    with pytest.raises(CfdebugError, match="features.99") as err:
        resolve_target(model, "features.99")
    assert "features.1" in str(err.value)  # close names are listed


def test_layer_without_feature_map_errors():
    model = DemoCNN(num_classes=10).eval()
    with pytest.raises(CfdebugError, match="classifier"):
        resolve_target(model, "classifier")
    assert count_hooks(model) == 0


# ---------------------------------------------------------------- the registries


def test_builders_registry_and_torchvision_names():
    from cfdebug.models import BUILDERS, available_models

    assert isinstance(build_model("demo-cnn", 4), BUILDERS["demo-cnn"])
    names = available_models()
    assert names[0] == "demo-cnn" and "resnet18" in names and "vgg16" in names
    assert isinstance(build_model("googlenet", 3), nn.Module)  # needs its registered extra arguments


def test_target_rules_are_looked_up_by_architecture_and_its_bases():
    from cfdebug.models import TARGET_RULES

    assert {"DemoCNN", "ResNet", "VGG", "DenseNet", "EfficientNet", "MobileNetV2", "MobileNetV3"} <= set(TARGET_RULES)

    class WiderDemo(DemoCNN):  # a subclass keeps its base's rule
        pass

    torch.manual_seed(0)
    target = resolve_target(WiderDemo(num_classes=3))
    assert target.name == "features.19" and target.channels == 64


def test_an_architecture_without_a_rule_needs_its_layer_named():
    """AlexNet pools to 6×6 before its classifier, so no head runs on pooled features: instead of a
    head that fails later, the user is asked for the layer (and gets no head for it)."""
    torch.manual_seed(0)
    model = build_model("alexnet", 3).eval()
    with pytest.raises(CfdebugError, match="^Cannot find the last convolutional block of AlexNet automatically. Name it with `--layer`"):
        resolve_target(model)
    target = resolve_target(model, "features.11")
    assert target.name == "features.11" and target.channels == 256 and target.pooled_head is None and target.map_head is None
