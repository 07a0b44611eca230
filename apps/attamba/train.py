"""Train a attamba model: `python -m apps.attamba.train config=apps/attamba/configs/<run>.yaml [key=value ...]`."""

from lingua.train import main

if __name__ == "__main__":
    main(default_model_type="attamba")
