"""Backbones, heads, teacher and its BN-buffer policy (METHOD.md §1.1-§1.4)."""

import pytest
import torch
import torch.nn as nn
import torchvision

from vssl_fast.method import MethodConfig
from vssl_fast.models import SSLModel, build_backbone


def test_cifar_stem_exact():
    net = build_backbone("resnet18", cifar_stem=True)
    c = net.conv1
    assert (c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.bias) == (3, 64, (3, 3), (1, 1), (2, 2), None)
    assert isinstance(net.maxpool, nn.Identity) and isinstance(net.fc, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert net.conv1(x).shape[-2:] == (34, 34)  # padding 2, not 1
    sizes = []
    hooks = [getattr(net, f"layer{i}").register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for i in range(1, 5)]
    assert net.eval()(x).shape == (2, 512)
    assert sizes == [34, 17, 9, 5]
    for h in hooks:
        h.remove()


def test_imagenet_backbones_are_torchvision():
    r18 = build_backbone("resnet18")
    assert r18.conv1.kernel_size == (7, 7) and isinstance(r18.maxpool, nn.MaxPool2d)
    ref = torchvision.models.resnet18()
    ref.fc = nn.Identity()
    assert r18.state_dict().keys() == ref.state_dict().keys()
    r50 = build_backbone("resnet50").eval()
    assert r50(torch.randn(1, 3, 64, 64)).shape == (1, 2048)
    with pytest.raises(ValueError, match="unknown backbone 'vgg'"):
        build_backbone("vgg")


def test_vssl_and_byol_heads_dimensions():
    v = SSLModel("vssl", cifar_stem=True, proj_hidden_dim=32, pred_hidden_dim=48, denoiser_hidden_dim=24, proj_output_dim=8)
    b = SSLModel("byol", cifar_stem=True, proj_hidden_dim=32, pred_hidden_dim=48, proj_output_dim=8)
    h = torch.randn(4, 512)
    assert v.projector(h).shape == (4, 16) and v.predictor(v.projector(h)).shape == (4, 16)
    assert v.denoiser_mu(torch.randn(4, 8)).shape == (4, 8) and v.denoiser_var(torch.randn(4, 8)).shape == (4, 8)
    assert b.projector(h).shape == (4, 8) and b.predictor(b.projector(h)).shape == (4, 8)
    assert not hasattr(b, "denoiser_mu")
    # MLP shape: Linear - BN1d - ReLU - Linear, biases everywhere
    kinds = [type(m) for m in v.projector]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear] and v.projector[3].bias is not None
    # the same backbone code in both
    assert type(v.backbone) is type(b.backbone) and v.backbone.conv1.padding == b.backbone.conv1.padding
    sep = SSLModel("vssl", proj_hidden_dim=8, pred_hidden_dim=8, denoiser_hidden_dim=8, proj_output_dim=4,
                   head="separate_mlps", denoiser_input="params")
    assert sep.projector(torch.randn(3, 512)).shape == (3, 8) and sep.denoiser_mu[0].in_features == 8


def test_teacher_is_exact_copy_without_grad():
    m = SSLModel("vssl", cifar_stem=True, proj_hidden_dim=16, pred_hidden_dim=16, denoiser_hidden_dim=16, proj_output_dim=4)
    assert set(m.teacher.keys()) == {"backbone", "projector"}
    for (_, s), (_, t) in zip(m.backbone.state_dict().items(), m.teacher["backbone"].state_dict().items()):
        assert torch.equal(s, t)
    assert all(not p.requires_grad for p in m.teacher.parameters())
    groups = m.parameter_groups(1.0, 1e-5, 0.1)
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert not in_opt & {id(p) for p in m.teacher.parameters()}
    assert {id(p) for p in m.classifier.parameters()} <= in_opt
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lr"] == 0.1
    m2 = SSLModel("vssl", proj_hidden_dim=8, pred_hidden_dim=8, denoiser_hidden_dim=8, proj_output_dim=4, teacher_predictor=True)
    assert set(m2.teacher.keys()) == {"backbone", "projector", "predictor"}


@pytest.mark.parametrize("policy", ["own", "copy"])
def test_teacher_bn_buffer_policy(policy):
    from helpers import tiny_model

    cfg = MethodConfig(proj_output_dim=4, teacher_buffers=policy)
    m = tiny_model(cfg)
    x = torch.randn(6, 3, 8, 8)
    m.student_forward(x + 1.0)  # moves the student's running stats
    t_bn, s_bn = m.teacher["backbone"][1], m.backbone[1]
    before = t_bn.running_mean.clone()
    m.teacher_forward(x)  # train mode: batch stats, updates the teacher's own buffers
    assert m.teacher["backbone"].training and not torch.equal(before, t_bn.running_mean)
    own_stats = t_bn.running_mean.clone()
    m.ema_update(0.5, impl="reference")
    if policy == "own":
        assert torch.equal(t_bn.running_mean, own_stats)  # EMA never touches buffers
    else:
        assert torch.equal(t_bn.running_mean, s_bn.running_mean)
    assert t_bn.num_batches_tracked.dtype == torch.int64


def test_classifier_sees_detached_features():
    from helpers import tiny_model

    m = tiny_model(MethodConfig(proj_output_dim=4))
    h, proj, pred, logits = m.student_forward(torch.randn(4, 3, 8, 8))
    logits.sum().backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert m.classifier.weight.grad is not None
