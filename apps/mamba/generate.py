"""Generate from a Mamba2 checkpoint: `python -m apps.mamba.generate ckpt=RUN_DIR prompt="..." [key=value ...]`.

See lingua.generate for the keys (max_new_tokens, temperature, top_k, top_p, stop, prompts_file, ...).
"""

from lingua.generate import main

if __name__ == "__main__":
    main()
