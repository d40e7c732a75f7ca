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
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from vssl_fast.method import MethodConfig
from vssl_fast.typed import ConfigError, check_choices, field_docs, field_types, file_value, parse_value, show_value, type_name

__all__ = ["Config", "PRESETS", "load_config", "ConfigError", "config_from_dict", "help_text", "read_config_file",
           "apply_dict", "set_key"]


@dataclass
class ModelConfig:
    """The backbone (METHOD.md §1.1)."""

    backbone: Literal["resnet18", "resnet50"] = "resnet18"  # the torchvision ResNet, fc removed
    cifar_stem: bool = True  # METHOD.md §1.1: 3x3/1 conv1 with padding 2, no maxpool
    sync_batchnorm: Literal["auto", "true", "false"] = "auto"  # auto: SyncBatchNorm when world > 1 (solo-learn's recipe)
    channels_last: Literal["auto", "true", "false"] = "auto"  # auto: on CUDA; true: on any device (the CPU twin of the GPU path)


@dataclass
class DataConfig:
    """The data set, its loader and its augmentations (METHOD.md §3.4)."""

    dataset: Literal["cifar10", "cifar100", "imagefolder"] = "cifar10"  # imagefolder: ImageNet-100 and any class-folder JPEG tree
    path: str = "auto"  # a folder or tar; 'auto': $VSSL_DATA, then ../shared/data/cifar10-jpeg.tar.gz
    cache_dir: str = "~/.cache/vssl_fast"  # decoded CIFAR arrays and the image folders' scan results
    download: bool = False  # torchvision CIFAR download when the network allows
    augmentations: Literal["asymmetric", "symmetric"] = "asymmetric"  # asymmetric: solo-learn BYOL; symmetric: METHOD.md A9
    crop_size: int = 32  # the training crop in pixels (224 for ImageNet-100)
    train_subset: int = 0  # >0: use only the first N training images (smoke runs)
    val_subset: int = 0  # >0: a fixed random sample of N validation images
    workers: int = 0  # image folders: DataLoader workers / DALI reader processes / evaluation workers (0 = auto:
    # one per core for the torchvision path, min(4, cores) for DALI on a GPU (none on a CPU) and for evaluation)
    max_bad_fraction: float = 0.01  # image folders: a run fails when more than this share of a split's files is bad
    loader: Literal["auto", "gpu", "dali", "torchvision"] = "auto"  # gpu: device-resident CIFAR
    aug_chunk: int = 0  # device CIFAR: steps augmented per batched call (0 = auto: 16 on CUDA, 1 on a CPU)
    dali_threads: int = 0  # DALI pipeline threads (0 = auto: max(2, min(8, cores)))
    dali_hw_decoder_load: float = 0.65  # DALI on a GPU: share of JPEG work for the hardware decoder (DALI's default)
    max_image_pixels: int = 89_478_485  # image folders: larger images are bad files (PIL's decompression-bomb limit)
    num_classes: int = 0  # image folders: classes the dataset has (imagenet100: 100; 0 = any); other counts are logged


@dataclass
class OptimConfig:
    """The optimizer and the LR and EMA schedules (METHOD.md §2)."""

    name: Literal["lars", "lamb"] = "lars"  # lars: the paper's recipe
    impl: Literal["auto", "fused", "reference"] = "auto"  # auto: fused Triton where it can run
    lr: float = 1.0  # base LR for a global batch of 256 (scaled by batch/256)
    classifier_lr: float = 0.1  # base LR of the online linear classifier
    weight_decay: float = 1e-5  # of the SSL modules (the online classifier has none)
    momentum: float = 0.9  # the LARS momentum (LAMB keeps its own betas)
    eta: float = 0.02  # the LARS trust coefficient
    warmup_epochs: float = 10.0  # linear LR warm-up, then cosine decay to min_lr
    warmup_start_lr: float = 3e-5  # the LR at step 0 of the warm-up
    min_lr: float = 0.0  # the LR the cosine decay ends at
    tau_base: float = 0.99  # the teacher's EMA momentum at the start
    tau_final: float = 1.0  # the EMA momentum at the end (a cosine from tau_base)


@dataclass
class TrainConfig:
    """The length, batch, seed and execution of training."""

    epochs: int = 1000  # training epochs (the schedules span them)
    max_steps: int = 0  # >0: stop after this many optimizer steps (tests, smoke)
    batch_size: int = 256  # per device
    seed: int = 5  # model init, data order and augmentations
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: Literal["auto", "none", "default", "reduce-overhead"] = "auto"  # torch.compile mode (auto: vssl_fast.trainer)
    graph: Literal["auto", "on", "off"] = "auto"  # the whole step as one CUDA graph (vssl_fast.step; auto = off until measured)
    max_consecutive_skips: int = 5  # non-finite steps in a row before stopping with an error


@dataclass
class EvalConfig:
    """Evaluation during training (METHOD.md §3.5-§3.7)."""

    online_every_epochs: int = 1  # the online linear probe on the validation split, every N epochs
    knn_every_epochs: int = 50  # weighted kNN every N epochs (0 = only at the end)
    knn_k: tuple[int, ...] = (20, 200)  # neighbour counts, paired with knn_t
    knn_t: tuple[float, ...] = (0.07, 0.1)  # softmax temperatures, paired with knn_k
    knn_chunk: int = 1024  # validation images per similarity block (memory)
    knn_train_subset: int = 0  # >0: a fixed stratified random sample of this many train images as the kNN bank
    feature_dtype: Literal["fp32", "bf16"] = "fp32"  # images and backbone precision for kNN, online and linear eval


@dataclass
class CheckpointConfig:
    """Checkpoints (atomic; vssl_fast.checkpoint)."""

    every_steps: int = 1000  # a checkpoint every N steps, and at every epoch end
    keep: int = 2  # how many of the newest checkpoints to keep (at least 2)


@dataclass
class LogConfig:
    """What a run writes and shows (vssl_fast.monitor)."""

    every_steps: int = 50  # a step line in train.log and a row in metrics.jsonl every N steps
    tensorboard: bool = True  # also write the rows to TensorBoard (run_dir/tb) when installed
    progress: bool = True  # a progress bar on a terminal (train.log and metrics.jsonl still get every step line)
    plots: bool = True  # loss.png and accuracy.png at the end (needs matplotlib)
    wandb: bool = False  # also log the rows to Weights & Biases (pip install -e ".[wandb]"; WANDB_MODE=offline works)
    wandb_project: str = "vssl-fast"  # the W&B project; the run is named after the run dir


@dataclass
class DistConfig:
    """Several processes (torchrun)."""

    timeout_s: int = 600  # the process group's timeout: hangs become errors


@dataclass
class Config:
    preset: str = "cifar10"  # the preset the settings start from (a config file may name it too)
    run_dir: str = "runs/default"  # where the run writes; a dir that holds a run is only continued with --resume
    resume: str = "none"  # none | auto (the newest good checkpoint in the run dir) | <path to a checkpoint>
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
        for key in ("sync_batchnorm", "channels_last"):  # bools from configs saved before 'auto' existed are accepted
            v = getattr(self.model, key)
            if isinstance(v, bool | str):
                setattr(self.model, key, str(v).lower())
        self.method.validate()
        for sec, section in _sections(self):
            check_choices(section, sec)
        if self.train.graph == "on" and self.train.compile == "reduce-overhead":
            # reduce-overhead makes inductor capture CUDA-graph trees of its own, which cannot nest in ours
            raise ConfigError("train.graph=on with train.compile=reduce-overhead: both capture CUDA graphs and "
                              "PyTorch does not nest them; use train.compile=default (or none) with train.graph=on, "
                              "or train.graph=off")
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
    for key, v in _settings(cfg).items():
        if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))):
            raise ConfigError(f"{key}: must be a finite number, got {v!r}")


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
def _sections(cfg) -> list[tuple[str, object]]:
    """(name, section) for every dataclass section of ``cfg``, in declaration order."""
    return [(f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


def set_key(cfg: Config, dotted: str, raw: str) -> None:
    """Set ``section.key`` (or a top-level key) from a string, with a clear error for bad keys."""
    parts = dotted.split(".")
    target = cfg
    for i, part in enumerate(parts[:-1]):
        types_ = field_types(target)
        if part not in types_ or not dataclasses.is_dataclass(getattr(target, part)):
            sections = [k for k, v in types_.items() if dataclasses.is_dataclass(getattr(target, k))]
            raise ConfigError(f"unknown config section '{'.'.join(parts[: i + 1])}'; sections: {sections}")
        target = getattr(target, part)
    name = parts[-1]
    types_ = field_types(target)
    if name not in types_:
        where = ".".join(parts[:-1]) or "top level"
        raise ConfigError(f"unknown config key '{dotted}' (in {where}); valid keys: {sorted(types_)}")
    if dataclasses.is_dataclass(getattr(target, name)):
        raise ConfigError(f"'{dotted}' is a section; set one of its keys, e.g. --{dotted}.<key>=value")
    setattr(target, name, parse_value(dotted, raw, types_[name]))


def read_config_file(path: str) -> dict:
    """The settings of a JSON file (YAML for .yaml/.yml, when PyYAML is importable) as nested dicts."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config {path}: reading YAML needs PyYAML, which is not installed (pip install pyyaml, "
                              "or pip install -e '.[yaml]'); or give the config as JSON") from None
        try:
            d = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of sections to settings, got {type(d).__name__}")
    return d


def apply_dict(cfg: Config, d: dict, where: str) -> None:
    """Set the settings of a (full or partial) nested dict on ``cfg``; unknown keys and bad values name ``where``."""
    types_ = field_types(cfg)
    for key, val in d.items():
        if key not in types_:
            raise ConfigError(f"{where}: unknown config key '{key}' (top level); valid keys: {sorted(types_)}")
        target = getattr(cfg, key)
        try:
            if not dataclasses.is_dataclass(target):
                setattr(cfg, key, file_value(key, val, types_[key]))
                continue
            if not isinstance(val, dict):
                raise ConfigError(f"'{key}' is a section: give a mapping of its keys, got {val!r}")
            sec_types = field_types(target)
            for k, v in val.items():
                if k not in sec_types:
                    raise ConfigError(f"unknown config key '{key}.{k}' (in {key}); valid keys: {sorted(sec_types)}")
                setattr(target, k, file_value(f"{key}.{k}", v, sec_types[k]))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def load_config(argv: list[str], description: str | None = None) -> Config:
    """Parse ``[-h] [--config FILE] [--preset NAME] [--run-dir DIR] [--resume auto|PATH] [--section.key=value ...]``.

    The preset (``--preset``, else the file's ``preset``, else cifar10) gives the starting values, the
    config file's settings apply over it, and the command line's over both. ``-h``/``--help`` prints
    ``help_text(description)`` and exits 0, as argparse does.
    """
    args = list(argv)
    if "-h" in args or "--help" in args:
        try:
            print(help_text(description), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader has gone; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    preset, files, pairs = None, [], []
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
        elif key == "config":
            files.append(val)
        else:
            pairs.append((key, val))
        i += 1
    loaded = [(f, read_config_file(f)) for f in files]
    where = "--preset"
    if preset is None:
        named = [(f, d["preset"]) for f, d in loaded if "preset" in d]
        where, preset = named[-1] if named else ("--preset", "cifar10")
    if preset not in PRESETS:
        raise ConfigError(f"{where}: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    try:
        for f, d in loaded:
            apply_dict(cfg, {k: v for k, v in d.items() if k != "preset"}, f)
        for key, val in pairs:
            set_key(cfg, key, val)
        return cfg.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------- help
_USAGE = ("usage: python train.py [-h] [--config FILE] [--preset NAME] [--run-dir DIR] [--resume none|auto|PATH] "
          "[--debug]\n                       [--section.key=VALUE ...]")


def _settings(cfg: Config) -> dict:
    """{'section.key' (or a top-level key): value} of every setting."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not dataclasses.is_dataclass(getattr(cfg, f.name))}
    for sec, section in _sections(cfg):
        out.update({f"{sec}.{f.name}": getattr(section, f.name) for f in dataclasses.fields(section)})
    return out


def _section_doc(cls) -> str:
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else doc.strip().splitlines()[0]  # dataclass's generated doc


def help_text(description: str | None = None) -> str:
    """Every setting as ``--section.key TYPE (default: V)`` and its description, by section, then the presets."""
    base = Config()
    top = field_docs(Config)
    out = [_USAGE, ""] + ([description.strip(), ""] if description else [])
    options = [
        ("-h, --help", "print this help and exit"),
        ("--config FILE", "a JSON config (YAML too when PyYAML is installed), full or partial, e.g. a run's config.json; "
                          "its settings apply over the preset, the command line's over both; unknown keys are errors"),
        ("--preset NAME", f"{' | '.join(PRESETS)} (default: {base.preset}; see 'presets' below); {top.get('preset', '')}"),
        ("--run-dir DIR", f"(or --run_dir) {top.get('run_dir', '')} (default: {base.run_dir})"),
        ("--resume VALUE", f"{top.get('resume', '')} (default: {base.resume})"),
        ("--debug", "print the traceback of known failures too (or VSSL_DEBUG=1)"),
    ]
    out.append("options:")
    out += [f"  {flag:<16}{text}" for flag, text in options]
    for sec, section in _sections(base):
        doc = _section_doc(type(section))
        out += ["", f"{sec}: {doc}" if doc else f"{sec}:"]
        docs = field_docs(type(section))
        for name, tp in field_types(section).items():
            out.append(f"  --{sec}.{name} {type_name(tp)}  (default: {show_value(getattr(section, name))})")
            out.append(f"      {docs.get(name, '')}".rstrip())
    out += ["", "presets (--preset NAME): each sets these over the defaults above"]
    defaults = _settings(base)
    for name, make in PRESETS.items():
        diff = [f"{k}={show_value(v)}" for k, v in _settings(make()).items() if k != "preset" and v != defaults[k]]
        out += textwrap.wrap(" ".join(diff) or "(the defaults)", 118, initial_indent=f"  {name:<13}",
                             subsequent_indent=" " * 15, break_on_hyphens=False)
    return "\n".join(out)


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
