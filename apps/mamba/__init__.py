"""Mamba2 baseline: pre-norm blocks of a Mamba2 mixer (Attamba's KV-SSM over whole documents)."""

from apps.mamba.args import MambaArgs
from apps.mamba.model import MambaLM
from lingua.registry import register_model

register_model("mamba", MambaArgs, MambaLM)
