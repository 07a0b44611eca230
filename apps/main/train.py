"""Train a transformer model: `python -m apps.main.train config=apps/main/configs/<run>.yaml [key=value ...]`."""

from lingua.train import main

if __name__ == "__main__":
    main(default_model_type="transformer")
