"""Export the student backbone for use elsewhere.

    python -m vssl_fast.export --ckpt RUN/checkpoints/step_XXXXXXXX.pt --out exported/

writes ``backbone.pt`` (the backbone's state dict: torchvision ResNet keys, no ``fc``: the trained
network has no classifier there, it outputs the pooled feature), ``backbone.safetensors`` (the
same tensors) and ``backbone.json`` (architecture, stem, feature dim, source checkpoint, step);
every file gets the usual mode (0666 less the umask, e.g. 0644). A stock torchvision ResNet loads
it with ``strict=True`` once its ``fc`` is ``Identity`` (and, for CIFAR runs, its stem is the
3x3 one); this is the README's snippet, which a test runs:

    import json, torch, torchvision
    meta = json.load(open("exported/backbone.json"))
    model = getattr(torchvision.models, meta["arch"])()
    if meta["cifar_stem"]:  # CIFAR runs: 3x3 stride-1 conv1 with padding 2, no max-pool (METHOD.md 1.1)
        model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 2, bias=False)
        model.maxpool = torch.nn.Identity()
    model.fc = torch.nn.Identity()  # no classifier in the export: model(x) is the 512-d (2048 for resnet50) feature
    model.load_state_dict(torch.load("exported/backbone.pt", weights_only=True), strict=True)

``load_exported(out_dir)`` does the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

__all__ = ["export_backbone", "load_exported", "main"]


def export_backbone(ckpt_path: str | Path, out_dir: str | Path) -> dict:
    from vssl_fast.checkpoint import load_checkpoint
    from vssl_fast.models import FEATURE_DIMS

    state = load_checkpoint(ckpt_path)
    cfg = state["config"]
    sd = {k[len("backbone."):]: v.clone() for k, v in state["model"].items() if k.startswith("backbone.")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out / "backbone.pt")
    written = [out / "backbone.pt"]
    meta = {"arch": cfg["model"]["backbone"], "cifar_stem": cfg["model"]["cifar_stem"],
            "feature_dim": FEATURE_DIMS[cfg["model"]["backbone"]], "source": str(ckpt_path), "step": int(state["step"]),
            "method": cfg["method"]["method"], "fc": "Identity (not exported: set model.fc = torch.nn.Identity())"}
    try:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "backbone.safetensors"),
                  metadata={k: str(v) for k, v in meta.items()})
        meta["safetensors"] = True
        written.append(out / "backbone.safetensors")
    except ImportError:
        meta["safetensors"] = False
    (out / "backbone.json").write_text(json.dumps(meta, indent=2))
    written.append(out / "backbone.json")
    mode = 0o666 & ~_umask()  # safetensors writes 0600, torch.save 0666 less the umask: make them agree
    for f in written:
        os.chmod(f, mode)
    return meta


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    m = os.umask(0o022)
    os.umask(m)
    return m


def load_exported(out_dir: str | Path) -> torch.nn.Module:
    """Rebuild the torchvision ResNet from an export, strictly."""
    import torchvision

    out = Path(out_dir)
    meta = json.loads((out / "backbone.json").read_text())
    net = getattr(torchvision.models, meta["arch"])(weights=None)
    if meta["cifar_stem"]:
        net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        net.maxpool = torch.nn.Identity()
    net.fc = torch.nn.Identity()
    net.load_state_dict(torch.load(out / "backbone.pt", weights_only=True), strict=True)
    return net


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vssl_fast.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    print(json.dumps(export_backbone(a.ckpt, a.out), indent=2))
    return 0


if __name__ == "__main__":
    from vssl_fast import faults

    sys.exit(faults.run(main, sys.argv[1:]))  # known failures: one line and train.py's exit codes
