"""Attamba: attention over chunk-boundary states of key/value SSMs plus a window of recent tokens."""

from apps.attamba.args import AttambaArgs
from apps.attamba.model import AttambaLM
from lingua.registry import register_model

register_model("attamba", AttambaArgs, AttambaLM)
