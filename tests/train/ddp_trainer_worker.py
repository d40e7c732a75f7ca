"""Run under torchrun by tests/train/test_ddp_graph.py: the real trainer, with a non-finite loss at
chosen steps and an optional crash, then rank 0 saves its final state for a bit-for-bit comparison.

    torchrun --nproc_per_node=2 ddp_trainer_worker.py OUT BAD_STEPS CRASH_AT [--force-broadcast] [--tiny-backbone] \
        -- TRAIN_ARGS...

BAD_STEPS: comma-separated steps whose loss is made NaN (skipped by every rank alike); CRASH_AT: the
step before which every rank dies (os._exit, no save), 0 for none; --force-broadcast: DDP broadcasts
buffers (its default) although SyncBatchNorm keeps them equal, to compare with the product's choice;
--tiny-backbone: a two-conv backbone for ResNet-18 (the fused kernels under the Triton interpreter).
"""

import os
import sys

import torch
import torch.distributed as dist

from vssl_fast.config import load_config
from vssl_fast.trainer import Trainer


def main(argv):
    out, bad, crash = argv[0], {int(s) for s in argv[1].split(",") if s}, int(argv[2])
    rest = argv[3:]
    force = "--force-broadcast" in rest
    args = rest[rest.index("--") + 1:]
    if force:
        orig = torch.nn.parallel.DistributedDataParallel.__init__

        def init(self, *a, **k):
            k["forward_sync_buffers" if "forward_sync_buffers" in k else "broadcast_buffers"] = True
            orig(self, *a, **k)

        torch.nn.parallel.DistributedDataParallel.__init__ = init
    if "--tiny-backbone" in rest[:rest.index("--")]:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
        from helpers import tiny_backbone

        from vssl_fast import models

        models.FEATURE_DIMS["resnet18"] = 8
        models.build_backbone = lambda name="resnet18", cifar_stem=False: tiny_backbone(8)
    tr = Trainer(load_config(args))
    fwd = tr.stepper.forward

    def forward(*a):
        taking = tr.stepper.step + 1
        if taking == crash:
            os._exit(17)  # a crash: nothing saved after the last checkpoint
        loss, parts = fwd(*a)
        return (loss * float("nan"), parts) if taking in bad else (loss, parts)

    tr.stepper.forward = forward
    try:
        tr.fit()
        state = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
        # BatchNorm buffers equal on every rank (the reason DDP need not broadcast them)
        bufs = torch.cat([b.double().flatten() for n, b in tr.model.named_buffers() if "running" in n])
        both = [torch.zeros_like(bufs) for _ in range(dist.get_world_size())]
        dist.all_gather(both, bufs)
        info = {"graph": tr.stepper.graph_mode, "broadcast_buffers": tr.ddp.broadcast_buffers,
                "skipped": int(tr.stepper.skipped), "buffers_equal": all(torch.equal(both[0], b) for b in both),
                "optimizer": type(tr.opt).__name__, "device_schedule": tr.stepper.device_schedule,
                "precision": "bf16" if tr.stepper.amp_dtype == torch.bfloat16 else "fp32",
                "opt": [st["momentum_buffer"].clone() for st in tr.opt.state.values()]}
        if dist.get_rank() == 0:
            torch.save({"state": state, "info": info}, out)
    finally:
        tr.close()


if __name__ == "__main__":
    main(sys.argv[1:])
    # the state is saved and the group left: skip the interpreter's teardown, where a rank of the interpreter
    # (TRITON_INTERPRET=1) bf16 run once died by SIGABRT ("terminate called without an active exception")
    # after a complete run, failing the launch that the comparison had already passed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
