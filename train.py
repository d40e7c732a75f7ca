"""Train VSSL (or the BYOL control) and evaluate it.

One process (CPU or one GPU):
    python train.py --preset smoke                       # a few minutes on a CPU, real CIFAR-10 JPEGs
    python train.py --preset cifar10 --run-dir runs/c10  # the paper's CIFAR-10 recipe on one GPU
    python train.py --preset cifar10 --method.method=byol --run-dir runs/c10-byol
Several processes on one machine (gloo on CPU, NCCL on GPUs):
    torchrun --standalone --nproc_per_node=2 train.py --preset smoke --run-dir runs/smoke2
    torchrun --standalone --nproc_per_node=8 train.py --preset imagenet100 --data.path=data/imagenet100
Several nodes (run on every node; NODE_RANK 0..N-1, MASTER = the first node's address):
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=$MASTER:29500 --rdzv_id=vssl train.py --preset imagenet100
Resume after an interruption: add --resume auto (the newest good checkpoint in the run dir); a run
dir that holds a run is only ever continued, with --resume.
Settings: python train.py --help lists them all (type, default, choices, description) and the presets.
The preset, then --config FILE (JSON; YAML with PyYAML; e.g. a run's own config.json), then
--section.key=value overrides; unknown keys are errors. --log.wandb=true also logs to W&B.
Failures end with one line and an exit code (README, "Exit codes"); --debug or VSSL_DEBUG=1 adds tracebacks.
"""

import sys

from vssl_fast import faults
from vssl_fast.config import load_config
from vssl_fast.trainer import Trainer


def train(argv: list[str]) -> None:
    cfg = load_config(argv, description=__doc__)  # -h/--help prints every setting and exits 0
    trainer = Trainer(cfg)
    stuck = False
    try:
        trainer.fit()
    except BaseException as e:
        stuck = faults.classify(e)[0] == faults.DistributedError.exit_code  # a peer or a collective is stuck
        raise
    finally:
        trainer.close(abort=stuck)  # stuck: abort the process group; destroying it would wait on the collective


def main(argv: list[str]) -> int:
    code = faults.run(train, argv)  # known failures -> one line and their exit code
    if code == faults.DistributedError.exit_code:
        faults.exit_now(code)  # the line is out; no finalizer may wait on the stuck group
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
