"""Training objectives, one module each (config `objective:`), per model family; see base.Method for
the interface. `method_for` is the one place the family is looked at: the Trainer never names it."""

from ..model import model_config, model_family
from .base import Method, Tokens
from .distill import Distill
from .finetune import Finetune
from .seq2seq import Seq2SeqDistill, Seq2SeqFinetune

METHODS: dict[str, type[Method]] = {m.name: m for m in (Finetune, Distill)}  # decoder-only
FAMILIES: dict[str, dict[str, type[Method]]] = {
    "causal": METHODS,
    "seq2seq": {m.name: m for m in (Seq2SeqFinetune, Seq2SeqDistill)},  # encoder-decoder (T5)
}


def method_for(cfg) -> type[Method]:
    """The method class for (the model's family, cfg.objective), after it has checked the config."""
    method = FAMILIES[model_family(model_config(cfg.model))][cfg.objective]
    method.check(cfg)
    return method


__all__ = ["FAMILIES", "METHODS", "Method", "Tokens", "method_for"]
