"""Worker for the distributed evaluation test: a tiny FSDP-sharded transformer scores the rolling
log-likelihood of a few texts through the lm-eval adapter; each rank writes its scores and how
many forward passes it made as JSON.

    torchrun --nproc_per_node 2 tests/lingua/eval_worker.py OUT_PREFIX fsdp
    python tests/lingua/eval_worker.py OUT_PREFIX none     (one process, the reference)
"""

import json
import sys

import torch
from lm_eval.api.instance import Instance

from apps.main.model import TransformerArgs, TransformerLM
from lingua import distributed
from lingua.eval import LinguaLM
from lingua.tokenizer import ByteTokenizer

# 3 + 2 + 3 + 1 = 9 windows of at most 16 bytes: one process makes 5 passes of 2; two ranks share
# the 5 batches in 3 rounds, so rank 0 scores 3 batches and rank 1 scores 2, then idles a pass.
TEXTS = ["a" * 40, "The quick brown fox.", "jumps over the lazy dog " * 2, "z"]


def main(out_prefix: str, parallelism: str) -> None:
    env = distributed.init_distributed(distributed.DistributedArgs(parallelism=parallelism), "cpu")
    distributed.seed_everything(0)
    model = TransformerLM(TransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=258, max_seqlen=16, multiple_of=16))
    model.init_weights()
    model = distributed.parallelize_model(model, distributed.DistributedArgs(parallelism=parallelism), env).eval()
    passes = []
    model.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0].shape[0]))
    lm = LinguaLM(model, ByteTokenizer(), batch_size=2, max_context=16)
    scores = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(TEXTS)], disable_tqdm=True)
    with open(f"{out_prefix}.{env.rank}.json", "w") as handle:
        json.dump({"scores": scores, "passes": len(passes)}, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
