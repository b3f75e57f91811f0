"""Training objectives, one module each (config `objective:`); see base.Method for the interface."""
from .base import Method, Tokens
from .distill import Distill
from .finetune import Finetune

METHODS: dict[str, type[Method]] = {m.name: m for m in (Finetune, Distill)}

__all__ = ["METHODS", "Method", "Tokens"]
