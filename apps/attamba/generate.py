"""Generate from an Attamba checkpoint: `python -m apps.attamba.generate ckpt=RUN_DIR prompt="..." [key=value ...]`.

See lingua.generate for the keys (max_new_tokens, temperature, top_k, top_p, stop, prompts_file,
and model.* overrides such as model.eval_token_chunk=16).
"""

from lingua.generate import main

if __name__ == "__main__":
    main()
