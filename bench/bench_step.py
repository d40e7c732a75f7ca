"""Training-step throughput: the plain reference step, the product's fast step, the backbone floor.

    python -m bench.bench_step                 # the issue-7 grid on a GPU: 32 px (B 256, 512), 224 px (B 128, 256)
    python -m bench.bench_step --tiny          # smoke run on the CPU

Variants, in the same process on the same card, after warm-up (and compilation):
  (a) reference: typical SSL code: eager, fp16 autocast with a GradScaler, contiguous memory,
      the reference losses, per-parameter LARS (solo-learn's, host syncs) and a per-parameter EMA loop;
  (b) fast: what the trainer runs by default: bf16 autocast, channels-last, fused Triton losses,
      FusedLARS, multi-tensor EMA, the non-finite skip flag, torch.compile per train.compile=auto
      (``--compile-modes auto,none,default,reduce-overhead`` times each mode, to decide by measurement);
  (c) floor: the backbone alone: student forward+backward on both views, teacher forward, bf16
      channels-last, eager.
Views/s = 2 B / median step time. The JSON rows carry card, versions, date and git revision.
"""

from __future__ import annotations

import argparse
import copy

import torch
from vssl_fast.kernels import LARSReference, ema_update_loop_

from bench.common import bench_device, env_info, header, markdown_table, time_ms, write_results
from vssl_fast.config import load_config
from vssl_fast.models import SSLModel
from vssl_fast.optim import build_optimizer
from vssl_fast.step import TrainStep
from vssl_fast.trainer import resolve_compile_mode


def _model(cfg, num_classes, device, channels_last):
    torch.manual_seed(0)
    m = SSLModel(**cfg.method.model_kwargs(), backbone=cfg.model.backbone, cifar_stem=cfg.model.cifar_stem,
                 num_classes=num_classes).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


class ReferenceStep:
    """(a): what common SSL code does, for comparison (not used by the trainer)."""

    def __init__(self, model, cfg, device):
        self.model, self.cfg = model, cfg
        groups = model.parameter_groups(cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.classifier_lr)
        self.opt = LARSReference(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, eta=cfg.optim.eta)
        self.cuda = device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.cuda else None
        self.mcfg = cfg.method.replace(impl="reference")

    def __call__(self, x1, x2, y):
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
            loss, _ = self.model(x1, x2, y, self.mcfg)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        t, s = self.model.ema_param_lists()
        ema_update_loop_(t, s, 0.996)


class FloorStep:
    """(c): student backbone forward+backward on both views plus the teacher backbone forward."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __call__(self, x1, x2, y):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            out = sum(self.model.backbone(x).float().sum() for x in (x1, x2))
            with torch.no_grad():
                for x in (x1, x2):
                    self.model.teacher["backbone"](x)
        out.backward()
        for p in self.model.backbone.parameters():
            p.grad = None


def run_case(px: int, batch: int, device, tiny: bool, compile_modes=("auto",)) -> list[dict]:
    preset = "cifar10" if px <= 64 else "imagenet100"
    cfg = load_config(["--preset", preset, f"--data.crop_size={px}", f"--train.batch_size={batch}"])
    if tiny:
        for k in ("proj_hidden_dim", "pred_hidden_dim", "denoiser_hidden_dim"):
            setattr(cfg.method, k, 64)
        cfg.method.proj_output_dim = 32
    cuda = device.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    x1 = torch.randn(batch, 3, px, px, generator=g).to(device)
    x2 = torch.randn(batch, 3, px, px, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    rows = []

    def measure(name, step, xs, model):
        state = copy.deepcopy(model.state_dict())
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2 if tiny else 5):  # warm-up and compilation
            step(*xs)
        model.load_state_dict(state)  # restore the initial state before timing
        ms, lo, hi = time_ms(lambda: step(*xs), warmup=3, rep=30 if not tiny else 3)
        rows.append(dict(px=px, batch=batch, variant=name, ms=ms, p20=lo, p80=hi, views_per_s=2 * batch / (ms * 1e-3),
                         peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None))

    # (a) reference: contiguous fp32 weights, fp16 autocast, reference losses, per-parameter LARS + EMA loop
    m = _model(cfg, 10, device, channels_last=False)
    measure("a_reference", ReferenceStep(m, cfg, device), (x1, x2, y), m)
    del m
    # (b) the product's fast step, once per compile mode asked for ('auto' = what the trainer picks)
    cl = (lambda t: t.contiguous(memory_format=torch.channels_last)) if cuda else (lambda t: t)
    xb = (cl(x1.to(torch.bfloat16 if cuda else torch.float32)), cl(x2.to(torch.bfloat16 if cuda else torch.float32)), y)
    for requested in compile_modes:
        mode = resolve_compile_mode(requested, device, px)
        m = _model(cfg, 10, device, channels_last=cuda)
        forward = torch.compile(m, mode=mode) if mode != "none" else m
        opt = build_optimizer(m, cfg, 1)
        step = TrainStep(m, forward, opt, cfg.method, cfg.optim, device, torch.bfloat16 if cuda else None)
        measure(f"b_fast(compile={mode}{'=auto' if requested == 'auto' else ''})", step, xb, m)
        del m, step, opt, forward
        torch._dynamo.reset()
    # (c) the backbone floor
    m = _model(cfg, 10, device, channels_last=cuda)
    measure("c_backbone_floor", FloorStep(m, device), xb, m)
    a = next(r for r in rows if r["variant"] == "a_reference")["views_per_s"]
    c = rows[-1]["views_per_s"]
    for r in rows:
        if r["variant"].startswith("b_fast"):
            r["b_over_a"] = r["views_per_s"] / a
            r["b_over_c"] = r["views_per_s"] / c
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--cases", default="32x256,32x512,224x128,224x256", help="PXxBATCH,...")
    ap.add_argument("--compile-modes", default="auto",
                    help="fast-step variants to time, e.g. auto,none,default,reduce-overhead (train.compile by measurement)")
    ap.add_argument("--out", default="bench/results/step.jsonl")
    a = ap.parse_args(argv)
    cases = [(16, 4)] if a.tiny else [tuple(int(v) for v in c.split("x")) for c in a.cases.split(",")]
    env = env_info()
    device = bench_device()
    rows = []
    for px, b in cases:
        rows += run_case(px, b, device, a.tiny, tuple(a.compile_modes.split(",")))
        torch.cuda.empty_cache() if device.type == "cuda" else None
    print(header("training step", env))
    print(markdown_table(rows, ["px", "batch", "variant", "ms", "p20", "p80", "views_per_s", "b_over_a", "b_over_c",
                                "peak_mem_gb"]))
    write_results("step", rows, a.out, env)
    return rows


if __name__ == "__main__":
    main()
