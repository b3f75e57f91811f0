"""Inference: the gist KV caches and their decoders (causal, seq2seq), and the run loader that picks one."""

from .causal import GistKVCache, build_cache, generate_from_cache, generate_uncached, greedy
from .gist_model import GistModel
from .loader import RunModel, load_run

__all__ = [
    "GistKVCache",
    "GistModel",
    "RunModel",
    "build_cache",
    "generate_from_cache",
    "generate_uncached",
    "greedy",
    "load_run",
]
