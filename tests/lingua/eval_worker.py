"""Worker for the distributed evaluation tests, through the lm-eval adapter. ``score``: a tiny
FSDP-sharded transformer scores the rolling log-likelihood of a few texts; each rank writes its
scores and how many forward passes it made as JSON. ``generate``: the transformer (DDP, unwrapped
as training hands it to evaluation) answers generate_until requests; each rank writes the texts
and how many prompt batches it generated.

    torchrun --nproc_per_node 2 tests/lingua/eval_worker.py OUT_PREFIX fsdp [score]
    torchrun --nproc_per_node 2 tests/lingua/eval_worker.py OUT_PREFIX ddp generate
    python tests/lingua/eval_worker.py OUT_PREFIX none [score|generate]     (one process, the reference)
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
# Two generation settings: 3 + 2 prompts, one a batch: 5 batches, which two ranks share in 3 rounds.
GENERATE = [("abc", 4), ("The quick", 4), ("zz", 4), ("fox", 3), ("dog", 3)]


def generate(lm: LinguaLM) -> dict:
    import lingua.generate

    batches = []
    original = lingua.generate.generate_text

    def counting(*args, **kwargs):
        batches.append(len(args[2]))
        return original(*args, **kwargs)

    lingua.generate.generate_text = counting
    requests = [
        Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": tokens}), i)
        for i, (prompt, tokens) in enumerate(GENERATE)
    ]
    return {"texts": lm.generate_until(requests, disable_tqdm=True), "batches": len(batches)}


def main(out_prefix: str, parallelism: str, task: str = "score") -> None:
    env = distributed.init_distributed(distributed.DistributedArgs(parallelism=parallelism), "cpu")
    distributed.seed_everything(0)
    model = TransformerLM(TransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=258, max_seqlen=16, multiple_of=16))
    model.init_weights()
    model = distributed.parallelize_model(model, distributed.DistributedArgs(parallelism=parallelism), env).eval()
    if task == "generate":
        result = generate(LinguaLM(distributed.unwrap(model), ByteTokenizer(), batch_size=1, max_context=16))
        with open(f"{out_prefix}.{env.rank}.json", "w") as handle:
            json.dump(result, handle)
        distributed.destroy_distributed()
        return
    passes = []
    model.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0].shape[0]))
    lm = LinguaLM(model, ByteTokenizer(), batch_size=2, max_context=16)
    scores = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(TEXTS)], disable_tqdm=True)
    with open(f"{out_prefix}.{env.rank}.json", "w") as handle:
        json.dump({"scores": scores, "passes": len(passes)}, handle)
    distributed.destroy_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
