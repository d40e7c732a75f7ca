"""Validation and kNN-bank loading of class-folder trees: resize, centre crop, normalise (PIL, in workers)."""

from __future__ import annotations

from pathlib import Path

import torch

from vssl_fast.data.augment import MEANS_STDS
from vssl_fast.data.folder_files import SkippingImageFolder

__all__ = ["FolderEvalLoader"]


class FolderEvalLoader:
    """Resize 256 (shorter side) + centre crop 224 + normalise: solo-learn's torchvision validation transform
    (``transforms.Resize(256)``, bilinear with antialiasing; its DALI linear-eval pipeline resizes bicubically,
    ``interpolation="bicubic"``). ``subset`` > 0: a fixed stratified random sample of that many images."""

    def __init__(self, root, batch_size, rank, world, device, workers, crop=224, resize=256, interpolation="bilinear",
                 subset: int = 0):
        from torchvision import transforms as T

        from vssl_fast.data import BANK_SEED, stratified_subset

        modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
        if interpolation not in modes:
            raise ValueError(f"FolderEvalLoader: interpolation must be one of {sorted(modes)}, got {interpolation!r}")
        mean, std = MEANS_STDS["imagenet"]
        tf = T.Compose([T.Resize(resize, interpolation=modes[interpolation]), T.CenterCrop(crop), T.ToTensor(),
                        T.Normalize(mean, std)])
        self.root = Path(root)
        self.ds = SkippingImageFolder(root, tf)
        keep = stratified_subset(self.ds.inner.targets, subset, BANK_SEED) if subset else range(len(self.ds))
        idx = [int(i) for i in keep[rank::world]]
        self.num_samples = len(keep)  # over all ranks
        self.dl = torch.utils.data.DataLoader(torch.utils.data.Subset(self.ds, idx), batch_size=batch_size,
                                              num_workers=workers, shuffle=False)
        self.device = device

    def __iter__(self):
        for x, y in self.dl:
            yield x.to(self.device, non_blocking=True), y.to(self.device)

    def __len__(self):
        return len(self.dl)
