"""The Attamba framework's model-agnostic core: configs, data, training, evaluation, generation."""
