"""Transformer baselines (full, iso-KV attention width, GQA, sliding window)."""

from apps.main.model import TransformerArgs, TransformerLM
from lingua.registry import register_model

register_model("transformer", TransformerArgs, TransformerLM)
