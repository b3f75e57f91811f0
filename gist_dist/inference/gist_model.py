"""A distill artifact in use: the base model answering with k trained gist tokens in place of its prompt.

gm = GistModel.load("runs/compress")
gm.generate("What are your opening hours?")
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..data import GistTemplate
from ..masks import make_attention_mask
from .causal import greedy
from .decoding import device_dtype
from .loader import RunModel, load_run


class GistModel:
    """A distill artifact in use: the base model with k trained gist embeddings in place of a prompt."""

    def __init__(self, run: RunModel):
        self.run, self.model, self.tok, self.meta = run, run.model, run.tok, run.meta
        self.template = GistTemplate(run.tok, run.gist_ids, max_length=1 << 30, template=run.template or "alpaca")

    @classmethod
    def load(cls, directory, model_name: str | None = None, tokenizer: str | None = None) -> GistModel:
        return cls(load_run(directory, ModelConfig(name=model_name or "", tokenizer=tokenizer or "")))

    def prompt_and_tail(self, query: str, instruction: str | None = None) -> tuple[list[int], list[int]]:
        """(instruction when the artifact was trained with it visible + gist tokens, the query's tail)."""
        prompt, tail, _ = self.template.pieces({"instruction": instruction or "-", "input": query, "output": ""})
        return (prompt if instruction is not None else self.template.prefix) + self.run.gist_ids, tail

    def prompt_ids(self, query: str, instruction: str | None = None) -> list[int]:
        """The whole input for teacher-forced scoring: prompt_and_tail joined."""
        prompt, tail = self.prompt_and_tail(query, instruction)
        return prompt + tail

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        """[T, vocab] logits of one sequence under the gist mask (teacher-forced scoring)."""
        device = device_dtype(self.model)[0]
        input_ids = torch.tensor([ids], device=device)
        mask = make_attention_mask(
            input_ids, torch.ones_like(input_ids), self.run.gist_ids, "gist", self.model.dtype, prefix=self.run.prefix
        )
        return self.model(
            inputs_embeds=self.run.embed(input_ids),
            attention_mask=mask,
            position_ids=torch.arange(len(ids), device=device)[None],
        ).logits[0]

    def generate(self, query: str, instruction: str | None = None, max_new_tokens: int = 64) -> str:
        """Greedy answer. Without an instruction the gist embeddings stand in for the prompt."""
        prompt, tail = self.prompt_and_tail(query, instruction)
        answers, _ = greedy(
            self.model,
            [prompt],
            [tail],
            self.run.gist_ids,
            "gist",
            max_new_tokens,
            self.tok.eos_token_id,
            self.tok.pad_token_id,
            embed=self.run.embed,
            prefix=self.run.prefix,
        )
        return self.tok.decode(answers[0], skip_special_tokens=True).strip()
