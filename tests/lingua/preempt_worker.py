"""Worker for the preemption test: the training loop under torchrun where only rank 1 receives
SIGUSR1 (after its step 2); every rank must still stop, checkpoint and exit at the same step.

    torchrun --nproc_per_node 2 tests/lingua/preempt_worker.py key=value ...
"""

import os
import signal
import sys

from lingua import train as train_module


def signal_rank_one_after_step_two(self, global_step):
    if global_step == 2 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGUSR1)


if __name__ == "__main__":
    train_module.StepProfiler.step = signal_rank_one_after_step_two
    summary = train_module.train(train_module.load_train_args(sys.argv[1:], "transformer"))
    print(f"rank {os.environ.get('RANK')} stopped at step {summary['step']} preempted={summary['preempted']}", flush=True)
    train_module.distributed.destroy_distributed()
