"""Networks (METHOD.md §1): backbones, heads, the EMA teacher, the online classifier.

One ``SSLModel`` serves VSSL and the BYOL control: both share ``build_backbone`` and ``MLP``;
they differ in head widths (VSSL heads output ``2d`` = [mu || u], BYOL's ``d``), in the two
denoisers VSSL adds, and in the loss (``vssl_fast.method``).

Teacher BN-buffer policy (METHOD.md §1.3), flag ``teacher_buffers``:
- ``own`` (default, solo-learn): EMA averages parameters only. The teacher forward runs in
  train mode under no_grad, so its BN uses batch statistics and updates its *own* running
  buffers, which training never reads. ``ema_update`` leaves buffers untouched.
- ``copy``: after each EMA step the student's floating-point buffers are copied into the
  teacher (useful only to evaluate the teacher in eval mode).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torchvision

__all__ = ["build_backbone", "MLP", "SSLModel", "FEATURE_DIMS"]

FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048}


def build_backbone(name: str = "resnet18", cifar_stem: bool = False) -> nn.Module:
    """torchvision ResNet with ``fc`` = Identity; the CIFAR stem of METHOD.md §1.1 when asked.

    CIFAR stem: conv1 = Conv2d(3, 64, 3, stride 1, padding **2**, bias False) with PyTorch's
    default init (a 32x32 input gives 34x34), and maxpool = Identity.
    """
    if name not in FEATURE_DIMS:
        raise ValueError(f"build_backbone: unknown backbone {name!r}; choose one of {sorted(FEATURE_DIMS)}")
    net = getattr(torchvision.models, name)(weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class MLP(nn.Sequential):
    """Linear(in, hidden) - BN1d - ReLU - Linear(hidden, out); biases everywhere, no output BN."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )


class SplitMLPs(nn.Module):
    """``head: separate_mlps``: two full MLPs whose outputs are concatenated as [mu || u]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.mu = MLP(in_dim, hidden_dim, out_dim)
        self.var = MLP(in_dim, hidden_dim, out_dim)

    def forward(self, x):
        return torch.cat([self.mu(x), self.var(x)], dim=-1)


def _gaussian_head(head: str, in_dim: int, hidden: int, d: int) -> nn.Module:
    if head == "shared_split":
        return MLP(in_dim, hidden, 2 * d)
    if head == "separate_mlps":
        return SplitMLPs(in_dim, hidden, d)
    raise ValueError(f"head must be 'shared_split' or 'separate_mlps', got {head!r}")


class SSLModel(nn.Module):
    """Student (backbone, projector, predictor[, denoisers], classifier) plus its EMA teacher.

    ``method='vssl'``: projector 512 -> Hp -> 2d, predictor 2d -> Hq -> 2d, denoisers
    (d or 2d) -> Hn -> d each. ``method='byol'``: projector 512 -> Hp -> d, predictor d -> Hq -> d.
    """

    def __init__(
        self,
        method: str = "vssl",
        backbone: str = "resnet18",
        cifar_stem: bool = False,
        num_classes: int = 10,
        proj_hidden_dim: int = 4096,
        proj_output_dim: int = 256,
        pred_hidden_dim: int = 4096,
        denoiser_hidden_dim: int = 4096,
        denoiser_input: str = "sample",
        head: str = "shared_split",
        teacher_predictor: bool = False,
        teacher_buffers: str = "own",
        backbone_module: nn.Module | None = None,
        feature_dim: int | None = None,
    ):
        super().__init__()
        if method not in ("vssl", "byol"):
            raise ValueError(f"SSLModel: method must be 'vssl' or 'byol', got {method!r}")
        if teacher_buffers not in ("own", "copy"):
            raise ValueError(f"SSLModel: teacher_buffers must be 'own' or 'copy', got {teacher_buffers!r}")
        if denoiser_input not in ("sample", "params"):
            raise ValueError(f"SSLModel: denoiser_input must be 'sample' or 'params', got {denoiser_input!r}")
        self.method, self.teacher_buffers, self.teacher_predictor = method, teacher_buffers, teacher_predictor
        d = proj_output_dim
        # backbone_module/feature_dim let tests use a tiny convnet; training always builds a ResNet.
        self.backbone = backbone_module if backbone_module is not None else build_backbone(backbone, cifar_stem)
        feat = feature_dim if feature_dim is not None else FEATURE_DIMS[backbone]
        self.feature_dim, self.latent_dim = feat, d
        if method == "vssl":
            self.projector = _gaussian_head(head, feat, proj_hidden_dim, d)
            self.predictor = _gaussian_head(head, 2 * d, pred_hidden_dim, d)
            den_in = d if denoiser_input == "sample" else 2 * d
            self.denoiser_mu = MLP(den_in, denoiser_hidden_dim, d)
            self.denoiser_var = MLP(den_in, denoiser_hidden_dim, d)
        else:
            self.projector = MLP(feat, proj_hidden_dim, d)
            self.predictor = MLP(d, pred_hidden_dim, d)
        self.classifier = nn.Linear(feat, num_classes)

        # The teacher: exact copies, no gradients, never in the optimizer.
        pairs = {"backbone": self.backbone, "projector": self.projector}
        if teacher_predictor:
            pairs["predictor"] = self.predictor
        self.teacher = nn.ModuleDict({k: copy.deepcopy(v) for k, v in pairs.items()})
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ parameters
    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(student, teacher) module pairs averaged by EMA (METHOD.md §1.3)."""
        return [(getattr(self, k), self.teacher[k]) for k in self.teacher.keys()]

    def ema_param_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student parameter lists, aligned, for ``ema_update_``."""
        t, s = [], []
        for student, teacher in self.momentum_pairs():
            t += list(teacher.parameters())
            s += list(student.parameters())
        return t, s

    def student_modules(self) -> dict[str, nn.Module]:
        names = ["backbone", "projector", "predictor"]
        if self.method == "vssl":
            names += ["denoiser_mu", "denoiser_var"]
        return {n: getattr(self, n) for n in names}

    def parameter_groups(self, lr: float, weight_decay: float, classifier_lr: float) -> list[dict]:
        """Student groups (METHOD.md §3.1): SSL modules at (lr, wd), classifier at (classifier_lr, 0)."""
        ssl = [p for m in self.student_modules().values() for p in m.parameters()]
        return [
            {"name": "ssl", "params": ssl, "lr": lr, "weight_decay": weight_decay},
            {"name": "classifier", "params": list(self.classifier.parameters()), "lr": classifier_lr, "weight_decay": 0.0},
        ]

    # ------------------------------------------------------------------ EMA
    @torch.no_grad()
    def ema_update(self, tau, impl: str = "auto") -> None:
        """theta_t <- tau theta_t + (1 - tau) theta_s over parameters (buffers per ``teacher_buffers``).

        ``tau`` is a float or a 0-d tensor on the parameters' device (no host sync).
        """
        from vssl_fast.kernels.ema import ema_update_

        t, s = self.ema_param_lists()
        ema_update_(t, s, tau, impl=impl)
        if self.teacher_buffers == "copy":
            for student, teacher in self.momentum_pairs():
                for bt, bs in zip(teacher.buffers(), student.buffers()):
                    if bt.is_floating_point():
                        bt.copy_(bs)

    # ------------------------------------------------------------------ forward
    def forward(self, x1, x2, labels=None, cfg=None, seed=0, eps=None):
        """The whole objective of one step (``vssl_fast.method.compute_loss``): returns (loss, parts).

        Going through ``forward`` lets DistributedDataParallel and torch.compile wrap the step.
        """
        from vssl_fast.method import MethodConfig, compute_loss

        out = compute_loss(self, x1, x2, labels, cfg if cfg is not None else MethodConfig(method=self.method),
                           seed=seed, eps=eps)
        return out.loss, out.parts

    # ------------------------------------------------------------------ forward pieces
    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.latent_dim
        return out[..., :d], out[..., d:]

    def student_forward(self, x: torch.Tensor):
        h = self.backbone(x)
        proj = self.projector(h)
        pred = self.predictor(proj)
        logits = self.classifier(h.detach())
        return h, proj, pred, logits

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher target, in train mode (BN batch statistics), never with gradients."""
        out = self.teacher["projector"](self.teacher["backbone"](x))
        if self.teacher_predictor:
            out = self.teacher["predictor"](out)
        return out
