"""Watching a run: log lines, a progress bar, metrics.jsonl, TensorBoard when installed, Weights & Biases
when asked for (``log.wandb=true``), PNG plots.

Nothing is written into the run dir before the start is accepted (``vssl_fast.rundir``): log lines
wait in memory until ``attach_log_file``, and TensorBoard's writer and the W&B run open with the
first record. W&B gets the numeric fields of every metrics.jsonl row with our ``step`` as its x-axis
(``define_metric``), so a resumed run, which logs some steps again, keeps one axis; the run id is
kept in ``run_dir/wandb_run_id`` and a resume continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
from pathlib import Path

from vssl_fast.faults import WriteError

__all__ = ["Monitor", "setup_logging", "attach_log_file", "require_wandb"]
_FMT = "%(asctime)s [rank {rank}] %(message)s"


def _not_drawn(record: logging.LogRecord) -> bool:
    return not getattr(record, "drawn_by_bar", False)


def setup_logging(rank: int, run_dir: Path | None = None) -> logging.Logger:
    """Log to stdout; to ``run_dir/train.log`` on rank 0 now, or (run_dir None) once ``attach_log_file`` is called."""
    log = logging.getLogger("vssl_fast")
    log.handlers.clear()
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    fmt = logging.Formatter(_FMT.format(rank=rank), "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    h.addFilter(_not_drawn)  # the step lines the progress bar draws stay off the terminal; train.log gets them
    log.addHandler(h)
    if rank == 0:  # the lines before the run dir is accepted wait here for train.log
        log.addHandler(logging.handlers.MemoryHandler(capacity=10**6, flushLevel=logging.CRITICAL + 1))
    log.propagate = False
    if run_dir is not None:
        attach_log_file(log, run_dir, rank)
    return log


def attach_log_file(log: logging.Logger, run_dir: Path, rank: int = 0) -> None:
    """Append the log to ``run_dir/train.log`` (rank 0), starting with the lines logged so far."""
    mem = [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    if rank != 0:
        return
    fh = logging.FileHandler(Path(run_dir) / "train.log")
    fh.setFormatter(logging.Formatter(_FMT.format(rank=rank), "%H:%M:%S"))
    for m in mem:
        m.setTarget(fh)
        m.flush()
        log.removeHandler(m)
        m.close()
    log.addHandler(fh)


def require_wandb():
    """The wandb module, or a ConfigError (exit 2) saying how to get it: log.wandb=true asked for it."""
    try:
        import wandb
    except ImportError:
        from vssl_fast.config import ConfigError

        raise ConfigError("log.wandb=true: the wandb package is not installed; pip install wandb (or pip install -e "
                          "'.[wandb]'), or leave log.wandb=false") from None
    return wandb


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, progress: bool, wandb_project: str | None = None,
                 config: dict | None = None):
        self.run_dir, self.enabled = run_dir, enabled
        self.progress = progress and enabled and sys.stdout.isatty()
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tb, self._tb_wanted = None, enabled and tensorboard
        self.wandb, self._wandb_wanted = None, enabled and wandb_project is not None
        self._wandb_project, self._config = wandb_project, config
        self.t0 = time.time()

    def _open_wandb(self):
        wandb = require_wandb()
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        self.wandb = wandb.init(project=self._wandb_project, name=self.run_dir.name, dir=str(self.run_dir),
                                config=self._config, id=run_id, resume="allow" if run_id else None)
        self._wandb_wanted = False
        self.wandb.define_metric("step")
        self.wandb.define_metric("*", step_metric="step")
        if run_id is None:
            id_file.write_text(self.wandb.id)

    def _open_tb(self):
        self._tb_wanted = False
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        except Exception:  # noqa: BLE001 - TensorBoard is optional
            self.tb = None

    def record(self, row: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise WriteError(f"could not append to {self.metrics_path}: {e.strerror or e}; free space or fix "
                             "permissions, then --resume auto") from e
        if self._tb_wanted:
            self._open_tb()
        if self.tb is not None:
            step = row.get("step", 0)
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, step)
        if self._wandb_wanted:
            self._open_wandb()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)})

    def step_line(self, log: logging.Logger, step: int, total: int, text: str) -> None:
        """A training step's line: always into the log (train.log); on a terminal the bar draws it instead of stdout."""
        log.info(text, extra={"drawn_by_bar": self.progress})
        self.bar(step, total, text)

    def bar(self, step: int, total: int, text: str) -> None:
        if not self.progress:
            return
        w = 30
        done = int(w * step / max(total, 1))
        sys.stdout.write(f"\r[{'#' * done}{'.' * (w - done)}] {step}/{total} {text}")
        sys.stdout.flush()

    def end_bar(self):
        if self.progress:
            sys.stdout.write("\n")

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def plots(self) -> list[Path]:
        """PNG plots of the loss parts and the accuracies over training (needs matplotlib)."""
        if not self.enabled or not self.metrics_path.exists():
            return []
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception:  # noqa: BLE001 - plots are optional
            return []
        rows = [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]
        train = [r for r in rows if r.get("kind") == "train"]
        ev = [r for r in rows if r.get("kind") == "eval"]
        panels = [("loss.png", "loss parts", "step", None, train, ("loss", "kl", "ll", "byol", "ce"), {}),
                  ("accuracy.png", "accuracy", "epoch", "top-1 (%)", ev,
                   sorted({k for r in ev for k in r if k.endswith("top1")}), {"marker": "o"})]
        out = []
        for fname, title, xkey, ylabel, sel, keys, style in panels:
            if not sel:
                continue
            fig, ax = plt.subplots(figsize=(7, 4))
            for key in keys:
                pts = [(r[xkey], r[key]) for r in sel if key in r]
                if pts:
                    ax.plot(*zip(*pts), label=key, **style)
            ax.set_xlabel(xkey)
            if ylabel:
                ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.legend()
            fig.savefig(self.run_dir / fname, dpi=100, bbox_inches="tight")
            plt.close(fig)
            out.append(self.run_dir / fname)
        return out
