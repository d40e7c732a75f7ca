"""Export: the README's loading snippet runs as written on a stock torchvision ResNet; file modes agree."""

import os
import re
import stat
from pathlib import Path

import pytest
import torch

from vssl_fast.checkpoint import save_checkpoint
from vssl_fast.config import Config
from vssl_fast.export import export_backbone
from vssl_fast.models import build_backbone

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text()
    m = re.search(r"<!-- export-snippet -->\n```python\n(.*?)```", text, re.S)
    assert m, "README.md has no ```python block after <!-- export-snippet -->"
    return m.group(1)


@pytest.mark.parametrize("cifar_stem", [True, False])
def test_readme_snippet_loads_the_export_strictly_into_a_stock_resnet(tmp_path, monkeypatch, cifar_stem):
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.cifar_stem = cifar_stem
    bb = build_backbone("resnet18", cifar_stem).eval()
    state = {"config": cfg.to_dict(), "model": {f"backbone.{k}": v for k, v in bb.state_dict().items()}}
    ck = save_checkpoint(state, tmp_path / "ck", 7)
    old = os.umask(0o022)
    try:
        export_backbone(ck, tmp_path / "exported")
    finally:
        os.umask(old)
    for name in ("backbone.pt", "backbone.safetensors", "backbone.json"):
        assert stat.S_IMODE((tmp_path / "exported" / name).stat().st_mode) == 0o644, name
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(_snippet(), "README.md export snippet", "exec"), scope)  # noqa: S102 - the documented snippet
    model = scope["model"].eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), bb(x))
