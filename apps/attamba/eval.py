"""Evaluate a checkpoint: `python -m apps.attamba.eval ckpt=RUN_DIR eval.tasks=[wikitext_local] [key=value ...]`.

See lingua.eval for the keys (eval.*, model.* overrides such as model.eval_token_chunk=16).
"""

from lingua.eval import main

if __name__ == "__main__":
    main()
