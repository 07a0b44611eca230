"""Evaluate a checkpoint: `python -m apps.mamba.eval ckpt=RUN_DIR eval.tasks=[wikitext_local] [key=value ...]`.

See lingua.eval for the keys (eval.*, and model.* overrides of the model's args).
"""

from lingua.eval import main

if __name__ == "__main__":
    main()
