"""Typed run configuration: sections of dataclasses, presets, and ``--section.key=value`` overrides.

    cfg = load_config(["--preset", "cifar10", "--optim.lr=2.0", "--method.method=byol"])

Unknown sections or keys and values of the wrong type are errors that name the key. The resolved
config is printed and saved as ``config.json`` in the run directory, and stored in checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field

from vssl_fast.method import MethodConfig

__all__ = ["Config", "PRESETS", "load_config", "ConfigError", "config_from_dict"]


class ConfigError(ValueError):
    """A bad configuration key or value; the message names it."""


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet18 | resnet50
    cifar_stem: bool = True  # METHOD.md §1.1: 3x3/1 conv1 with padding 2, no maxpool
    sync_batchnorm: str = "auto"  # auto (SyncBatchNorm when world > 1, as solo-learn's recipe) | true | false
    channels_last: str = "auto"  # auto (on CUDA) | true (any device: the CPU twin of the GPU path) | false


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | cifar100 | imagefolder (ImageNet-100 and any class-folder JPEG tree)
    path: str = "auto"  # a folder or tar; 'auto': $VSSL_DATA, then ../shared/data/cifar10-jpeg.tar.gz
    cache_dir: str = "~/.cache/vssl_fast"
    download: bool = False  # torchvision CIFAR download when the network allows
    augmentations: str = "asymmetric"  # asymmetric (solo-learn BYOL) | symmetric (METHOD.md A9)
    crop_size: int = 32
    train_subset: int = 0  # >0: use only the first N training images (smoke runs)
    val_subset: int = 0
    workers: int = 0  # image folders: DataLoader workers / DALI reader processes / evaluation workers (0 = auto:
    # one per core for the torchvision path, min(4, cores) for DALI on a GPU (none on a CPU) and for evaluation)
    max_bad_fraction: float = 0.01  # image folders: a run fails when more than this share of a split's files is bad
    loader: str = "auto"  # auto | gpu (device-resident CIFAR) | dali | torchvision
    aug_chunk: int = 0  # device CIFAR: steps augmented per batched call (0 = auto: 16 on CUDA, 1 on a CPU)
    dali_threads: int = 0  # DALI pipeline threads (0 = auto: max(2, min(8, cores)))
    dali_hw_decoder_load: float = 0.65  # DALI on a GPU: share of JPEG work for the hardware decoder (DALI's default)
    max_image_pixels: int = 89_478_485  # image folders: larger images are bad files (PIL's decompression-bomb limit)
    num_classes: int = 0  # image folders: classes the dataset has (imagenet100: 100; 0 = any); other counts are logged


@dataclass
class OptimConfig:
    name: str = "lars"  # lars (the paper's recipe) | lamb
    impl: str = "auto"  # auto (fused Triton where it can run) | fused | reference
    lr: float = 1.0  # base LR for a global batch of 256 (scaled by batch/256)
    classifier_lr: float = 0.1
    weight_decay: float = 1e-5
    momentum: float = 0.9
    eta: float = 0.02
    warmup_epochs: float = 10.0
    warmup_start_lr: float = 3e-5
    min_lr: float = 0.0
    tau_base: float = 0.99
    tau_final: float = 1.0


@dataclass
class TrainConfig:
    epochs: int = 1000
    max_steps: int = 0  # >0: stop after this many optimizer steps (tests, smoke)
    batch_size: int = 256  # per device
    seed: int = 5
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    compile: str = "auto"  # auto | none | default | reduce-overhead (see vssl_fast.trainer for the measured choice)
    graph: str = "auto"  # auto | on | off: the whole step as one CUDA graph (vssl_fast.step; auto = off until measured)
    max_consecutive_skips: int = 5  # non-finite steps in a row before stopping with an error


@dataclass
class EvalConfig:
    online_every_epochs: int = 1
    knn_every_epochs: int = 50
    knn_k: tuple = (20, 200)
    knn_t: tuple = (0.07, 0.1)
    knn_chunk: int = 1024
    knn_train_subset: int = 0  # >0: a fixed stratified random sample of this many train images as the kNN bank
    feature_dtype: str = "fp32"  # fp32 | bf16: images and backbone precision for kNN, online and linear eval


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 2


@dataclass
class LogConfig:
    every_steps: int = 50
    tensorboard: bool = True  # when installed
    progress: bool = True
    plots: bool = True


@dataclass
class DistConfig:
    timeout_s: int = 600  # the process group's timeout: hangs become errors


@dataclass
class Config:
    preset: str = "cifar10"
    run_dir: str = "runs/default"
    resume: str = "none"  # none | auto | <path to a checkpoint>
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def validate(self) -> Config:
        _check_finite(self)
        self.method.validate()
        checks = [
            ("model.backbone", self.model.backbone, ("resnet18", "resnet50")),
            ("data.dataset", self.data.dataset, ("cifar10", "cifar100", "imagefolder")),
            ("data.augmentations", self.data.augmentations, ("asymmetric", "symmetric")),
            ("data.loader", self.data.loader, ("auto", "gpu", "dali", "torchvision")),
            ("optim.name", self.optim.name, ("lars", "lamb")),
            ("optim.impl", self.optim.impl, ("auto", "fused", "reference")),
            ("train.precision", self.train.precision, ("auto", "bf16", "fp16", "fp32")),
            ("train.compile", self.train.compile, ("auto", "none", "default", "reduce-overhead")),
            ("train.graph", self.train.graph, ("auto", "on", "off")),
            ("eval.feature_dtype", self.eval.feature_dtype, ("fp32", "bf16")),
        ]
        for key, val, choices in checks:
            if val not in choices:
                raise ConfigError(f"{key}: invalid value {val!r}; choose one of {list(choices)}")
        positive = [("train.batch_size", self.train.batch_size), ("train.epochs", self.train.epochs),
                    ("data.crop_size", self.data.crop_size), ("data.max_image_pixels", self.data.max_image_pixels),
                    ("ckpt.keep", self.ckpt.keep),
                    ("log.every_steps", self.log.every_steps), ("ckpt.every_steps", self.ckpt.every_steps),
                    ("dist.timeout_s", self.dist.timeout_s),
                    ("train.max_consecutive_skips", self.train.max_consecutive_skips)]
        for key, val in positive:
            if val < 1:
                raise ConfigError(f"{key}: must be >= 1, got {val}")
        counts = [("train.max_steps", self.train.max_steps), ("data.train_subset", self.data.train_subset),
                  ("data.val_subset", self.data.val_subset), ("data.workers", self.data.workers),
                  ("data.aug_chunk", self.data.aug_chunk), ("data.dali_threads", self.data.dali_threads),
                  ("data.num_classes", self.data.num_classes)]
        for key, val in counts:
            if val < 0:
                raise ConfigError(f"{key}: must be >= 0 (0 = no limit, or the default), got {val}")
        if self.ckpt.keep < 2:
            raise ConfigError(f"ckpt.keep: keep at least 2 checkpoints, got {self.ckpt.keep}")
        if self.optim.lr < 0 or self.optim.classifier_lr < 0:
            raise ConfigError("optim.lr / optim.classifier_lr: must be >= 0")
        if not 0 <= self.optim.tau_base <= self.optim.tau_final <= 1:
            raise ConfigError(f"optim.tau_base/tau_final: need 0 <= tau_base <= tau_final <= 1, got "
                              f"{self.optim.tau_base}, {self.optim.tau_final}")
        sbn = {True: "true", False: "false"}.get(self.model.sync_batchnorm, str(self.model.sync_batchnorm).lower())
        if sbn not in ("auto", "true", "false"):  # bools from configs saved before 'auto' existed are accepted
            raise ConfigError(f"model.sync_batchnorm: invalid value {self.model.sync_batchnorm!r}; "
                              "choose one of ['auto', 'true', 'false']")
        self.model.sync_batchnorm = sbn
        cl = {True: "true", False: "false"}.get(self.model.channels_last, str(self.model.channels_last).lower())
        if cl not in ("auto", "true", "false"):  # bools from configs saved before 'auto' existed are accepted
            raise ConfigError(f"model.channels_last: invalid value {self.model.channels_last!r}; "
                              "choose one of ['auto', 'true', 'false']")
        self.model.channels_last = cl
        if self.eval.knn_train_subset < 0:
            raise ConfigError(f"eval.knn_train_subset: must be >= 0 (0 = the whole train set), got "
                              f"{self.eval.knn_train_subset}")
        if not 0.0 <= self.data.max_bad_fraction <= 1.0:
            raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {self.data.max_bad_fraction}")
        if not 0.0 <= self.data.dali_hw_decoder_load <= 1.0:
            raise ConfigError(f"data.dali_hw_decoder_load: must be in [0, 1], got {self.data.dali_hw_decoder_load}")
        if self.data.path != "auto":  # absolute, so checkpoints and config.json work from any directory
            self.data.path = os.path.abspath(os.path.expanduser(self.data.path))
        if len(self.eval.knn_k) != len(self.eval.knn_t):
            raise ConfigError(f"eval.knn_k and eval.knn_t must pair up, got {self.eval.knn_k} and {self.eval.knn_t}")
        return self


def _check_finite(cfg: Config) -> None:
    """Every float setting, and every number in a tuple setting, must be finite (optim.lr=nan names the key)."""
    for sec in dataclasses.fields(cfg):
        section = getattr(cfg, sec.name)
        if not dataclasses.is_dataclass(section):
            continue
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))):
                raise ConfigError(f"{sec.name}.{f.name}: must be a finite number, got {v!r}")


# ----------------------------------------------------------------------------- presets
def _cifar(num_classes: int) -> Config:
    c = Config(preset=f"cifar{num_classes}")
    c.data.dataset = f"cifar{num_classes}"
    return c


def _imagenet100() -> Config:
    c = Config(preset="imagenet100")
    c.method.pred_hidden_dim = 8192
    c.model.cifar_stem = False
    c.data.dataset = "imagefolder"
    c.data.crop_size = 224
    c.data.path = "data/imagenet100"
    c.data.num_classes = 100
    c.optim.lr = 0.5
    c.optim.weight_decay = 1e-6
    c.train.epochs = 400
    c.eval.knn_every_epochs = 50
    return c


def _smoke() -> Config:
    """A few minutes on a 2-core CPU with real CIFAR-10 JPEGs: a small run end to end."""
    c = _cifar(10)
    c.preset = "smoke"
    c.method.proj_hidden_dim = c.method.pred_hidden_dim = c.method.denoiser_hidden_dim = 512
    c.method.proj_output_dim = 64
    c.data.train_subset = 2048
    c.data.val_subset = 1000
    c.train.batch_size = 64
    c.train.epochs = 2
    c.optim.warmup_epochs = 0.5
    c.eval.knn_every_epochs = 2
    c.eval.knn_k = (20, 200)
    c.eval.knn_t = (0.07, 0.1)
    c.ckpt.every_steps = 16
    c.log.every_steps = 8
    c.run_dir = "runs/smoke"
    return c


PRESETS = {"cifar10": lambda: _cifar(10), "cifar100": lambda: _cifar(100), "imagenet100": _imagenet100, "smoke": _smoke}


# ----------------------------------------------------------------------------- parsing
def _coerce(key: str, raw: str, typ):
    origin = typing.get_origin(typ)
    if typ is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean (true/false), got {raw!r}")
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    if typ is str:
        return raw
    if typ is tuple or origin is tuple:
        parts = [p for p in raw.replace("(", "").replace(")", "").split(",") if p.strip()]
        try:
            vals = [float(p) if any(ch in p for ch in ".eE") else int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"{key}: expected a comma-separated list of numbers, got {raw!r}") from None
        return tuple(vals)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.strip().lower() in ("none", "null"):
            return None
        return _coerce(key, raw, args[0])
    raise ConfigError(f"{key}: cannot parse values of type {typ}")


def _field_types(obj) -> dict:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def set_key(cfg: Config, dotted: str, raw: str) -> None:
    """Set ``section.key`` (or a top-level key) from a string, with a clear error for bad keys."""
    parts = dotted.split(".")
    target = cfg
    for i, part in enumerate(parts[:-1]):
        types_ = _field_types(target)
        if part not in types_ or not dataclasses.is_dataclass(getattr(target, part)):
            sections = [k for k, v in types_.items() if dataclasses.is_dataclass(getattr(target, k))]
            raise ConfigError(f"unknown config section '{'.'.join(parts[: i + 1])}'; sections: {sections}")
        target = getattr(target, part)
    name = parts[-1]
    types_ = _field_types(target)
    if name not in types_:
        where = ".".join(parts[:-1]) or "top level"
        raise ConfigError(f"unknown config key '{dotted}' (in {where}); valid keys: {sorted(types_)}")
    if dataclasses.is_dataclass(getattr(target, name)):
        raise ConfigError(f"'{dotted}' is a section; set one of its keys, e.g. --{dotted}.<key>=value")
    setattr(target, name, _coerce(dotted, raw, types_[name]))


def load_config(argv: list[str]) -> Config:
    """Parse ``[--preset NAME] [--run-dir DIR] [--resume auto|PATH] [--section.key=value ...]``."""
    args = list(argv)
    preset = "cifar10"
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r}; overrides look like --section.key=value")
        body = a[2:]
        if "=" in body:
            key, val = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"option --{body} needs a value")
            key, val = body, args[i + 1]
            i += 1
        key = {"run-dir": "run_dir"}.get(key, key)
        if key == "preset":
            preset = val
        else:
            pairs.append((key, val))
        i += 1
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    for key, val in pairs:
        try:
            set_key(cfg, key, val)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    try:
        return cfg.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config from ``to_dict()`` output (checkpoints, config.json)."""
    cfg = Config()
    for sec, val in d.items():
        if isinstance(val, dict):
            target = getattr(cfg, sec)
            for k, v in val.items():
                setattr(target, k, tuple(v) if isinstance(v, list) else v)
        else:
            setattr(cfg, sec, val)
    return cfg


def device_formats(cfg: Config, device) -> tuple:
    """(autocast dtype or None, loader image dtype, channels-last?) for ``device``: one rule for the
    trainer, the loaders and the benchmarks.

    ``auto`` means the GPU defaults on CUDA (bf16 autocast, bf16 images, channels-last) and fp32
    contiguous on the CPU; ``train.precision=bf16`` and ``model.channels_last=true`` select the
    GPU configuration on a CPU too (its CPU twin in the tests).
    """
    import torch

    cuda = device.type == "cuda"
    prec = cfg.train.precision
    if prec == "fp32" or (prec == "auto" and not cuda):
        amp = None
    else:
        amp = torch.float16 if prec == "fp16" else torch.bfloat16
    images = torch.bfloat16 if amp == torch.bfloat16 else torch.float32
    cl = cfg.model.channels_last == "true" or (cfg.model.channels_last == "auto" and cuda)
    return amp, images, cl
