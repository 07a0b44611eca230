"""Worker for the distributed tests: a few optimizer steps of a tiny transformer on a fixed
global batch, each rank taking its share of the rows; rank 0 writes the mean losses as JSON.

    torchrun --nproc_per_node 2 tests/lingua/dist_worker.py OUT.json fsdp
    torchrun --nproc_per_node 2 tests/lingua/dist_worker.py OUT.json ddp model   # compiled whole
"""

import json
import sys

import torch
import torch.nn.functional as F

from apps.main.model import TransformerArgs, TransformerLM
from lingua import distributed
from lingua.optim import OptimArgs, build_optimizer


def main(out_path: str, parallelism: str, compile_scope: str = "") -> None:
    args = distributed.DistributedArgs(parallelism=parallelism, compile=bool(compile_scope), compile_scope=compile_scope or "block")
    env = distributed.init_distributed(args, "cpu")
    distributed.seed_everything(0)
    model = TransformerLM(TransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, max_seqlen=16))
    model.init_weights()
    model = distributed.parallelize_model(model, args, env)
    optimizer, scheduler = build_optimizer(model, OptimArgs(lr=1e-2, warmup=0, scheduler="constant"), 10)
    generator = torch.Generator().manual_seed(1)
    global_batch = torch.randint(0, 64, (4, 17), generator=generator)
    rows = global_batch.shape[0] // env.world_size
    local = global_batch[env.rank * rows : (env.rank + 1) * rows]
    losses = []
    for _ in range(4):
        logits = model(local[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), local[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(distributed.all_reduce_mean(loss.detach(), env).item())
    if env.is_main:
        with open(out_path, "w") as handle:
            json.dump(losses, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
