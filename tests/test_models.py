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


def test_convstem_deit_patch_grid_heads_and_distillation():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_convstem_patch16_224", num_classes=10, depth=2)
    assert model.patch_embed.grid_size == (14, 14)
    stem = [m for m in model.patch_embed.proj if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.stride[0]) for m in stem] == [(24, 2), (48, 2), (96, 2), (192, 2), (192, 1)]
    images = torch.randn(2, 3, 224, 224)
    tokens = model.forward_features(images)
    assert tokens.shape == (2, 1 + 196, 192)
    model.eval()
    logits = model(images)
    assert logits.shape == (2, 10)
    model.train()
    model.set_distilled_training(True)
    cls_logits, distill_logits = model.forward_head(tokens)
    x = model.fc_norm(tokens)
    assert torch.allclose(distill_logits, model.head_dist(x[:, 1:].mean(1)), atol=1e-6)  # the mean of the patches
    assert torch.allclose(cls_logits, model.head(x[:, 0]), atol=1e-6)
    with pytest.raises(ValueError, match="power-of-two patch size"):
        timm.create_model("deit_tiny_convstem_patch16_224", patch_size=12, img_size=96)


def test_convstem_deit_distils_on_its_mean_patch_head():
    from vkd.distillers import Distiller, MethodConfig

    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_convstem_patch16_224", num_classes=10, img_size=32, patch_size=4, depth=1)
    teacher = timm.create_model("resnet8x4", num_classes=10)
    distiller = Distiller(student, teacher, MethodConfig.for_method("vkd", kd_weight=1.0, ce_weight=1.0))
    logits, terms = distiller(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert logits.shape == (4, 10) and set(terms) == {"ce", "kd", "vkd"}
    sum(terms.values()).backward()
    assert student.head_dist.weight.grad.abs().sum() > 0 and student.patch_embed.proj[0].weight.grad is not None
