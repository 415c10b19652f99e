import pytest
import timm
import torch

import vkd.models
from vkd.models import CIFAR_MODELS

# Parameter counts of the standard definitions (mdistiller / CRD), 100 classes.
PARAMS_100 = {"resnet8x4": 1_233_540, "resnet32x4": 7_433_860}


@pytest.mark.parametrize("name,count", PARAMS_100.items())
def test_parameter_counts_match_the_standard_definitions(name, count):
    model = timm.create_model(name, num_classes=100)
    assert sum(p.numel() for p in model.parameters()) == count


SPATIAL = {"mobilenetv2_cifar": 2, "resnet50_cifar": 4}
WIDTH = {"mobilenetv2_cifar": 1280, "resnet50_cifar": 2048, "resnet8x4": 256, "resnet32x4": 256, "wrn_40_2": 128}


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_uniform_feature_interface(name):
    model = timm.create_model(name, num_classes=10, **({"depth": 2} if "deit" in name else {})).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        logits = model(x)
        distilled = vkd.models.distillation_features(model, features)
    d = model.num_features
    if "deit" in name:  # class token + 64 patch tokens; distillation sees the patch tokens only
        assert features.shape == (2, 65, d) and distilled.shape == (2, 64, d)
    else:
        side = SPATIAL.get(name, 8)
        assert features.shape == (2, d, side, side) and distilled is features
    assert d == WIDTH.get(name, d)
    assert pooled.shape == (2, d)
    torch.testing.assert_close(logits, model.get_classifier()(pooled))
    assert logits.shape == (2, 10)


def test_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="no published weights"):
        timm.create_model("resnet8x4", pretrained=True)


def test_mdistiller_parameter_names():
    names = set(timm.create_model("resnet8x4").state_dict())
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer3.0.conv2.weight",
            "fc.bias"} <= names
    names = set(timm.create_model("wrn_40_2").state_dict())
    assert {"conv1.weight", "block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight", "bn1.weight",
            "fc.weight"} <= names
    assert vkd.models.CifarResNet is not None
