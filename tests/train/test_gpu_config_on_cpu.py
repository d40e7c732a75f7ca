"""The GPU configuration, as far as a CPU can take it: the trainer with channels-last weights and
inputs, bf16 autocast, the fused Triton losses, FusedLARS and the EMA kernel (interpreter), and the
skip flag. The first GPU run crashed at step 1 on channels-last weights in FusedLARS: this test
fails if the fast step ever meets a channels-last model it cannot step.

ResNet-18 through the Triton interpreter takes ~10 s per optimizer launch, so the backbone here
is a small conv net with BatchNorm (4-D weights, as ResNet's); everything else is the product's.
"""

import pytest
import torch
from helpers import tiny_backbone
from helpers_train import tiny_args
from vssl_fast.kernels import FusedLARS
from vssl_fast.kernels._common import interpret_mode

from vssl_fast import models
from vssl_fast.config import device_formats, load_config
from vssl_fast.trainer import Trainer

GPU_DEFAULTS = ["--model.channels_last=true", "--train.precision=bf16", "--method.impl=fused", "--optim.impl=fused",
                "--train.compile=none"]


def _tiny_resnet(monkeypatch, width=8):
    monkeypatch.setitem(models.FEATURE_DIMS, "resnet18", width)
    monkeypatch.setattr(models, "build_backbone", lambda name="resnet18", cifar_stem=False: tiny_backbone(width))


@pytest.mark.parametrize("graph", ["off", "on"])  # 'on' is the graph-ready step on a CPU (no capture)
def test_trainer_runs_the_gpu_configuration_on_the_cpu(graph, cifar_tiny_tar, tmp_path, monkeypatch):
    assert interpret_mode(), "conftest runs the kernels under the interpreter without CUDA"
    _tiny_resnet(monkeypatch)
    argv = tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=3, data__crop_size=16,
                     data__train_subset=32, data__val_subset=8, eval__knn_train_subset=8, eval__knn_k=4,
                     eval__knn_t=0.1, log__plots="false", train__graph=graph) + GPU_DEFAULTS
    cfg = load_config(argv)
    amp, images, cl = device_formats(cfg, torch.device("cpu"))
    assert (amp, images, cl) == (torch.bfloat16, torch.bfloat16, True)
    tr = Trainer(cfg)
    try:
        student = [p for g in tr.opt.param_groups for p in g["params"]]
        convs = [p for p in student if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                             for p in tr.model.parameters() if p.dim() == 4), "conv weights are not channels-last"
        assert isinstance(tr.opt, FusedLARS)
        assert tr.stepper.graph_mode == {"off": "off", "on": "static"}[graph]
        x1, x2, y = next(iter(tr.data.train))
        assert x1.dtype == torch.bfloat16 and x1.is_contiguous(memory_format=torch.channels_last)
        teacher0 = [t.detach().clone() for t in tr.model.ema_param_lists()[0]]
        res = tr.fit()
        assert res["steps"] == 3 and res["skipped_steps"] == 0
        for p in convs:  # layouts survive the fused steps; state in the parameter's layout
            assert p.is_contiguous(memory_format=torch.channels_last)
            assert tr.opt.state[p]["momentum_buffer"].stride() == p.stride()
        assert any(not torch.equal(a, b) for a, b in zip(teacher0, tr.model.ema_param_lists()[0])), "EMA did not move"

        # the skip flag: a non-finite batch leaves parameters, optimizer state and teacher as they were
        before = {k: v.clone() for k, v in tr.model.state_dict().items()}
        bufs = [tr.opt.state[p]["momentum_buffer"].clone() for p in convs]
        tr.stepper(torch.full_like(x1, float("nan")), x2, y)
        assert int(tr.stepper.skipped) == 1
        after = tr.model.state_dict()
        changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
        assert not changed, f"a skipped step changed {changed[:5]}"
        assert all(torch.equal(a, tr.opt.state[p]["momentum_buffer"]) for a, p in zip(bufs, convs))
    finally:
        tr.close()
