"""The Distiller's routing of outputs to loss terms; the methods a notebook may list."""

import re

import pytest
import timm
import torch
import torch.nn.functional as F

import vkd  # noqa: F401  (registers the CIFAR models)
from vkd.distillers import Distiller, MethodConfig, check_methods, method_of
from vkd.losses import KDLoss, VkDLoss


def test_distilled_deit_trains_its_class_head_on_labels_and_its_distillation_head_on_the_teacher():
    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=5)
    teacher = timm.create_model("resnet8x4", num_classes=5)  # 256-d pooled features >= the student's 192
    config = MethodConfig.for_method("vkd", kd_weight=1.0, temperature=1.0)
    distiller = Distiller(student, teacher, config).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    logits, terms = distiller(images, labels)

    tokens = student.forward_features(images)
    cls_logits, dist_logits = student.head(tokens[:, 0]), student.head_dist(tokens[:, 1])
    t_features, t_logits = distiller.teacher_outputs(images)
    torch.testing.assert_close(logits, cls_logits)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(cls_logits, labels))
    torch.testing.assert_close(terms["kd"], KDLoss(1.0)(dist_logits, t_logits))
    assert not torch.allclose(terms["kd"], KDLoss(1.0)(cls_logits, t_logits))
    vkd_loss: VkDLoss = distiller.losses["vkd"]
    torch.testing.assert_close(terms["vkd"], vkd_loss(tokens[:, 2:], t_features))  # mean of the patch tokens
    student.eval()
    torch.testing.assert_close(student(images), (cls_logits + dist_logits) / 2)  # DeiT's inference: mean of heads


def test_a_variant_is_its_method_with_its_own_options():
    assert [method_of(m) for m in ("srd", "srd+dkd", "srd@alpha2", "vkd@w@50")] == ["srd", "srd+dkd", "srd", "vkd"]
    check_methods(["ce", "srd", "srd@alpha2"], {"srd@alpha2": {"srd_alpha": 2.0}})
    variant = re.escape("a variant of a method needs a label after '@' and its own method_options")
    for methods, options in ((["srd", "srd@"], {"srd@": {"srd_alpha": 2.0}}),  # no label
                             (["srd", "srd@alpha2"], {}), (["srd", "srd@alpha2"], {"srd@alpha2": {}})):  # no options
        with pytest.raises(ValueError, match=variant):
            check_methods(methods, options)
    with pytest.raises(ValueError, match=re.escape("unknown method 'srdx'; expected one of")):
        check_methods(["srdx@a"], {"srdx@a": {"srd_alpha": 2.0}})
    with pytest.raises(ValueError, match=re.escape("unknown method option(s) ['srd_alfa']")):
        check_methods(["srd@a"], {"srd@a": {"srd_alfa": 2.0}})
    with pytest.raises(ValueError, match=re.escape("method_options names ['srd@b'], not among methods")):
        check_methods(["srd@a"], {"srd@a": {"srd_alpha": 2.0}, "srd@b": {"srd_alpha": 3.0}})
    check_methods(["ce", "srd"])  # a caller without per-entry options (notebook 04) ...
    with pytest.raises(ValueError, match=re.escape("'srd@a': this notebook takes no method_options")):
        check_methods(["srd", "srd@a"])  # ... refuses every variant


def test_vkd_from_a_narrower_teacher_names_the_option_that_allows_it():
    student, teacher = timm.create_model("resnet8x4", num_classes=10), timm.create_model("resnet20", num_classes=10)
    with pytest.raises(ValueError, match="the student has 256 features, the teacher 64; .* vkd_projector to 'linear'"):
        Distiller(student, teacher, MethodConfig.for_method("vkd"))
    linear = Distiller(student, teacher, MethodConfig.for_method("vkd", vkd_projector="linear"))
    _, terms = linear(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert terms["vkd"].isfinite()
