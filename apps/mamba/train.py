"""Train a Mamba2 model: `python -m apps.mamba.train config=apps/mamba/configs/<run>.yaml [key=value ...]`."""

from lingua.train import main

if __name__ == "__main__":
    main(default_model_type="mamba")
