"""Evaluation the way the field does it (METHOD.md §3.5-§3.7), and the evaluation commands.

- online linear probe: the classifier trained during pretraining on detached features, top-1/5
  on the validation split every epoch (backbone in eval mode: BN running statistics);
- weighted kNN (solo-learn's WeightedKNNClassifier): cosine similarity on L2-normalised backbone
  features, the k most similar bank samples vote with weight exp(sim / T); chunked on the device;
- the offline linear protocol (§3.6): frozen backbone in eval mode, a fresh Linear, SGD momentum
  0.9, lr 0.3 x batch/256, wd 0, 100 epochs, LR x0.1 at epochs 60 and 80, RRC + flip.

Features come from the student backbone in eval mode (``EVAL_NETWORK``; the commands take
``--network teacher`` too), extracted in fp32 (``eval.feature_dtype=fp32``, the default: fp32
images, no autocast, whatever the training precision) or under bf16 autocast (``eval.feature_dtype=bf16``,
on any device; the CIFAR loaders then hand bf16 images). The trainer and the commands share these rules.

Commands (one process, or every GPU of a node with torchrun: features are extracted in shards, the
linear head trains as DistributedDataParallel on slices of each global batch, and rank 0 writes the
result, the same as one process gives within round-off):
    python -m vssl_fast.evaluate knn    --ckpt RUN/checkpoints/step_XXXXXXXX.pt [--k 20,200 --t 0.07,0.1]
    python -m vssl_fast.evaluate linear --ckpt RUN/checkpoints/step_XXXXXXXX.pt [--epochs 100]
    torchrun --standalone --nproc_per_node=8 -m vssl_fast.evaluate linear --ckpt ... [--batch-size 256]
(any ``--section.key=value`` of the training config may follow, e.g. ``--data.path=...``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vssl_fast import faults

__all__ = ["knn_classify", "extract_features", "online_eval", "knn_eval", "linear_eval", "feature_amp_dtype",
           "EVAL_NETWORK", "main"]

EVAL_NETWORK = "student backbone"  # what the trainer's online probe and kNN evaluate (results.json: eval_network)


def feature_amp_dtype(cfg):
    """The autocast dtype of feature extraction for ``eval.feature_dtype``: None (fp32) or torch.bfloat16."""
    return {"fp32": None, "bf16": torch.bfloat16}[cfg.eval.feature_dtype]


def _autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _backbone_features(backbone, x, device, amp_dtype) -> torch.Tensor:
    """fp32 features of a batch: under autocast when ``amp_dtype`` is set, else in the weights' dtype."""
    x = x.to(device, non_blocking=True)
    if amp_dtype is None:
        x = x.to(next(backbone.parameters()).dtype)  # e.g. bf16 loader images into fp32 weights
    with _autocast(device, amp_dtype):
        return backbone(x).float()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's first dimension over ranks (sizes may differ by rank)."""
    world = _world()
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    mx = int(max(s.item() for s in sizes))
    pad = torch.zeros((mx - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    bufs = [torch.empty((mx, *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in range(world)]
    dist.all_gather(bufs, torch.cat([t, pad]))
    return torch.cat([b[: int(s.item())] for b, s in zip(bufs, sizes)])


@torch.no_grad()
def extract_features(backbone, loader, device, amp_dtype=None):
    was = backbone.training
    backbone.eval()
    feats, labels = [], []
    for x, y in loader:
        if faults.stop_requested():
            break  # SIGTERM/SIGUSR1: stop within a batch; the ranks agree just below
        feats.append(_backbone_features(backbone, x, device, amp_dtype))
        labels.append(y.to(device))
    backbone.train(was)
    faults.raise_if_stop_agreed()  # before the gathers, on every rank alike: StopRequested
    f = torch.cat(feats) if feats else torch.empty(0, device=device)
    y = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long, device=device)
    return gather_cat(f), gather_cat(y)


@torch.no_grad()
def knn_classify(train_f, train_y, test_f, test_y, k: int, T: float, num_classes: int, chunk: int = 1024):
    """Weighted cosine kNN: returns (top1, top5) accuracies in percent."""
    train_f = F.normalize(train_f.float(), dim=1)
    test_f = F.normalize(test_f.float(), dim=1)
    k = min(k, train_f.shape[0])
    c1 = c5 = 0
    for s in range(0, test_f.shape[0], chunk):
        if faults.stop_requested():
            break
        q, y = test_f[s:s + chunk], test_y[s:s + chunk]
        sim, idx = (q @ train_f.T).topk(k, dim=1)
        w = (sim / T).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_y[idx], w)
        pred = votes.topk(min(5, num_classes), dim=1).indices
        c1 += (pred[:, 0] == y).sum().item()
        c5 += (pred == y[:, None]).any(1).sum().item()
    faults.raise_if_stop_agreed()
    n = max(test_f.shape[0], 1)
    return 100.0 * c1 / n, 100.0 * c5 / n


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict:
    """{prefix}_top1 and {prefix}_top5 in percent."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    n = max(labels.shape[0], 1)
    return {f"{prefix}_top1": 100.0 * (top[:, 0] == labels).sum().item() / n,
            f"{prefix}_top5": 100.0 * (top == labels[:, None]).any(1).sum().item() / n}


@torch.no_grad()
def online_eval(model, loader, device, amp_dtype=None, val_feats=None) -> dict:
    """Top-1/top-5 (%) of the online classifier on the validation split.

    ``val_feats``: (features, labels) already extracted from ``loader``, to avoid a second pass.
    """
    feats, labels = val_feats or extract_features(model.backbone, loader, device, amp_dtype)
    return topk_accuracy(model.classifier(feats.to(model.classifier.weight.dtype)), labels, "online")


@torch.no_grad()
def knn_eval(backbone, bank_loader, val_loader, device, ks, ts, num_classes, chunk=1024, amp_dtype=None,
             val_feats=None) -> dict:
    tf, ty = extract_features(backbone, bank_loader, device, amp_dtype)
    vf, vy = val_feats or extract_features(backbone, val_loader, device, amp_dtype)
    out = {"knn_bank_size": int(tf.shape[0])}
    for k, t in zip(ks, ts):
        top1, top5 = knn_classify(tf, ty, vf, vy, int(k), float(t), num_classes, chunk)
        out[f"knn_k{int(k)}_t{t:g}_top1"] = top1
        out[f"knn_k{int(k)}_t{t:g}_top5"] = top5
    return out


def _rank_rows(batch_size: int, rank: int, world: int) -> slice:
    """This rank's rows of a global batch (the ranks' slices in rank order make the batch)."""
    if batch_size % world:
        raise ValueError(f"the linear batch ({batch_size}) must split evenly over {world} processes")
    b = batch_size // world
    return slice(rank * b, (rank + 1) * b)


def array_linear_batches(images, labels, batch_size, crop_size, mean, std, seed, rank=0, world=1):
    """Offline-linear training batches for a device-resident array dataset: RRC (0.08, 1) + flip.

    ``batch_size`` is the global batch; each of ``world`` ranks yields its slice of every batch, with
    the pixels one process would give those rows (the parameters are drawn for the whole batch)."""
    from vssl_fast.data.augment import ViewSpec, augment
    from vssl_fast.data.loader import batch_seed, epoch_indices

    spec = ViewSpec(crop_size=crop_size, jitter_p=0.0, gray_p=0.0, mean=mean, std=std)
    n, rows = images.shape[0], _rank_rows(batch_size, rank, world)

    def batches(epoch):
        order = epoch_indices(n, seed, epoch, n // batch_size, 1, batch_size, 0).to(images.device)  # [steps, batch]
        for s, idx in enumerate(order):
            g = torch.Generator(device=images.device).manual_seed(batch_seed(seed, 0, epoch, s * batch_size))
            yield augment(images.index_select(0, idx), spec, g, rows=rows), labels.index_select(0, idx[rows])

    return batches


class _SeededSamples(torch.utils.data.Dataset):
    """Sample i of one epoch with its transform seeded by (seed, epoch, i): the same crop and flip whichever
    process or worker loads it, so any number of processes trains on what one process would."""

    def __init__(self, ds, seed: int, epoch: int):
        self.ds, self.seed, self.epoch = ds, seed, epoch

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from vssl_fast.data.loader import batch_seed

        x, y, _ = self.ds.load(i, batch_seed(self.seed, 0, self.epoch, i))
        return x, y


def folder_linear_batches(train_dir, batch_size, crop_size, workers, seed, device, rank=0, world=1):
    """Offline-linear training batches for an image folder: RandomResizedCrop (bicubic) + flip, torchvision.

    ``batch_size`` is the global batch; each of ``world`` ranks loads only its slice of every batch."""
    from torchvision import transforms as T

    from vssl_fast.data.augment import MEANS_STDS
    from vssl_fast.data.folder_files import SkippingImageFolder
    from vssl_fast.data.loader import epoch_indices

    mean, std = MEANS_STDS["imagenet"]
    tf = T.Compose([T.RandomResizedCrop(crop_size, scale=(0.08, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    ds = SkippingImageFolder(train_dir, tf)
    rows = _rank_rows(batch_size, rank, world)

    def batches(epoch):
        order = epoch_indices(len(ds), seed, epoch, len(ds) // batch_size, 1, batch_size, 0)[:, rows]
        dl = torch.utils.data.DataLoader(_SeededSamples(ds, seed, epoch), batch_sampler=order.tolist(),
                                         num_workers=workers, pin_memory=device.type == "cuda")
        for x, y in dl:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return batches


def linear_eval(backbone, train_batches, val_loader, num_classes, device, *, epochs=100, batch_size=256, lr=0.3,
                amp_dtype=None, log=print, seed=0) -> dict:
    """Offline linear protocol (§3.6): frozen backbone in eval mode, a fresh Linear, SGD momentum 0.9,
    lr 0.3 x batch/256, wd 0, MultiStep x0.1 at 60% and 80% of the epochs (60 and 80 of 100).

    Under torchrun each process trains on its slice of every global batch of ``batch_size`` and the
    head is a DistributedDataParallel module (gradients averaged: the global batch's mean loss)."""
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    world = _world()
    head = lin = None
    opt = sched = None
    for ep in range(epochs):
        loss = None
        for x, y in train_batches(ep):
            with torch.no_grad():
                f = _backbone_features(backbone, x, device, amp_dtype)
            if head is None:
                with torch.random.fork_rng(devices=[]):  # the same initial head in one process or many
                    torch.manual_seed(seed)
                    lin = torch.nn.Linear(f.shape[1], num_classes)
                head = lin = lin.to(device)
                if world > 1:
                    head = torch.nn.parallel.DistributedDataParallel(
                        lin, device_ids=[device.index] if device.type == "cuda" else None)
                opt = torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0.0)
                sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(epochs * 0.6), int(epochs * 0.8)], gamma=0.1)
            loss = F.cross_entropy(head(f), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if sched is None:
            raise ValueError("linear_eval: the training split gave no full batch")
        sched.step()
        last = loss.detach().clone()
        if world > 1:
            dist.all_reduce(last)  # the global batch's loss, as one process computes it
            last /= world
        if (ep + 1) % max(1, epochs // 10) == 0:
            log(f"linear epoch {ep + 1}/{epochs} loss {last.item():.4f}")
    feats, labels = extract_features(backbone, val_loader, device, amp_dtype)
    with torch.no_grad():
        return {**topk_accuracy(lin(feats), labels, "linear"), "linear_last_loss": last.item()}


# ----------------------------------------------------------------------------- commands
NETWORK_PREFIX = {"student": "backbone.", "teacher": "teacher.backbone."}


def _load_backbone(ckpt_path, overrides, network="student"):
    from vssl_fast.checkpoint import load_checkpoint
    from vssl_fast.config import ConfigError, config_from_dict, set_key
    from vssl_fast.models import build_backbone

    state = load_checkpoint(ckpt_path)
    cfg = config_from_dict(state["config"])
    for ov in overrides:
        if not ov.startswith("--") or "=" not in ov:
            raise ConfigError(f"unexpected argument {ov!r}; overrides look like --section.key=value")
        k, v = ov[2:].split("=", 1)
        set_key(cfg, k, v)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(f"{ckpt_path}: {e}") from None
    bb = build_backbone(cfg.model.backbone, cfg.model.cifar_stem)
    pre = NETWORK_PREFIX[network]
    sd = {k[len(pre):]: v for k, v in state["model"].items() if k.startswith(pre)}
    if not sd:
        raise faults.CheckpointError(f"checkpoint {ckpt_path} has no '{pre}*' weights in its model (--network {network})")
    try:
        bb.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise faults.CheckpointError(f"checkpoint {ckpt_path}: its {network} backbone does not fit "
                                     f"model.backbone={cfg.model.backbone!r}: {faults.one_line(e)}") from e
    return cfg, bb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vssl_fast.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["knn", "linear"])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--network", choices=sorted(NETWORK_PREFIX), default="student",
                    help="which backbone to evaluate (METHOD.md §3.6: the student)")
    ap.add_argument("--k", default="20,200")
    ap.add_argument("--t", default="0.07,0.1")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=256, help="the linear protocol's global batch (split over processes)")
    ap.add_argument("--out", default="", help="write the result as JSON here")
    args, rest = ap.parse_known_args(argv)
    from vssl_fast.distributed import cleanup, init_distributed

    cfg, bb = _load_backbone(args.ckpt, rest, args.network)
    info = init_distributed(cfg.dist.timeout_s)  # under torchrun: every process extracts and trains on its shard
    try:
        return _run(args, cfg, bb, info)
    finally:
        if info.enabled:
            cleanup()


def _run(args, cfg, bb, info) -> int:
    """One evaluation command on this process's shard; rank 0 prints and writes the result."""
    from vssl_fast.data import build_data, reading_data

    device, rank, world = info.device, info.rank, info.world
    bb = bb.to(device)
    try:
        with reading_data(cfg.data):  # a DALI training pipeline is never built here (built on a first batch)
            data = build_data(cfg, device, rank, world)
    except faults.DataError as e:  # e.g. the data moved since training: one line, exit 4 (data), as train.py
        raise faults.DataError(f"{faults.one_line(e, 2000)} (the checkpoint's data.path is {cfg.data.path!r}; pass "
                               "--data.path=DIR to read the data elsewhere)") from e
    amp = feature_amp_dtype(cfg)  # the trainer's rule: eval.feature_dtype, not the training precision
    meta = {"ckpt": str(args.ckpt), "eval_network": f"{args.network} backbone", "eval_feature_dtype": cfg.eval.feature_dtype,
            "world_size": world}
    if args.command == "knn":
        ks = [int(x) for x in args.k.split(",")]
        ts = [float(x) for x in args.t.split(",")]
        val = extract_features(bb, data.val, device, amp)  # sharded over the ranks, gathered on every rank
        res = knn_eval(bb, data.bank, data.val, device, ks, ts, data.num_classes, cfg.eval.knn_chunk, amp,
                       val_feats=val)
        res["val_size"] = int(val[1].shape[0])
    else:
        bs = args.batch_size  # the global batch: each process trains on batch / world of it
        if hasattr(data.train, "images"):  # CIFAR on the device; solo-learn has no CIFAR protocol: RRC 32 + flip
            from vssl_fast.data import eval_input_dtype
            from vssl_fast.data.loader import DeviceEvalLoader

            # train and validate with the same statistics: the dataset's (CIFAR-100's for cifar100), as pretraining
            mean, std = data.train.specs[0].mean, data.train.specs[0].std
            batches = array_linear_batches(data.train.images, data.train.labels, bs, cfg.data.crop_size,
                                           mean, std, cfg.train.seed, rank, world)
            val = DeviceEvalLoader(data.val.images, data.val.labels, max(bs, 256), mean, std, rank, world,
                                   out_dtype=eval_input_dtype(cfg))
            n_val = data.val.images.shape[0]
        else:  # ImageNet-100 and other folders: §3.6 as written
            from pathlib import Path

            from vssl_fast.data.folder_eval import FolderEvalLoader
            from vssl_fast.data.folder_files import default_workers

            root, workers = Path(cfg.data.path), default_workers(cfg.data.workers, cap=4)  # min(4, cores) unless set
            batches = folder_linear_batches(root / "train", bs, cfg.data.crop_size, workers, cfg.train.seed, device,
                                            rank, world)
            # solo-learn's DALI linear pipeline resizes the validation images bicubically (256 -> 224 crop)
            crop = cfg.data.crop_size
            val = FolderEvalLoader(data.val.root, bs, rank, world, device, workers, crop=crop,
                                   resize=round(crop * 256 / 224), interpolation="bicubic")
            n_val = val.num_samples
        res = linear_eval(bb, batches, val, data.num_classes, device, epochs=args.epochs, batch_size=bs, amp_dtype=amp,
                          log=print if info.is_main else (lambda *_: None), seed=cfg.train.seed)
        res["val_size"] = n_val
    res.update(meta)
    if info.is_main:  # written once
        print(json.dumps(res, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(faults.run(main, sys.argv[1:]))  # known failures: one line and train.py's exit codes
