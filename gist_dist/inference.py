"""Use a distill artifact: the base model with k trained gist embeddings in place of a prompt.

    from gist_dist.inference import GistModel
    gm = GistModel.load("runs/compress")          # checks the base model's fingerprint
    print(gm.generate("What are your opening hours?"))
"""
from __future__ import annotations

import torch

from . import artifact
from .config import ModelConfig
from .data import GistTemplate
from .distill import GistDistiller
from .gist import add_gist_tokens, make_attention_mask
from .model import load_model, load_tokenizer, local_device


class GistModel:
    def __init__(self, model, tokenizer, distiller: GistDistiller, meta: dict):
        self.model, self.tok, self.distiller, self.meta = model, tokenizer, distiller, meta
        self.template = GistTemplate(tokenizer, distiller.gist_ids.tolist(), max_length=1 << 30)

    @classmethod
    def load(cls, directory, model_name: str | None = None, tokenizer: str | None = None) -> "GistModel":
        meta = artifact.load(directory)[1]
        cfg = ModelConfig(name=model_name or meta["base_model"], tokenizer=tokenizer or meta.get("tokenizer", ""),
                          dtype="fp32" if not torch.cuda.is_available() else "bf16")
        tok = load_tokenizer(cfg)
        num_old = len(tok)
        gist_ids = add_gist_tokens(tok, meta["num_gist"])
        model = load_model(cfg, vocab_min=num_old).eval()
        base = artifact.BaseModel(model.config, model.get_input_embeddings().weight)
        gist, meta = artifact.load(directory, expected_fingerprint=base)
        distiller = GistDistiller(model, gist_ids, gist.to(local_device(), model.dtype)).eval()
        return cls(model, tok, distiller, meta)

    def prompt_ids(self, query: str, instruction: str | None = None) -> list[int]:
        """Gist tokens (+ the instruction when the artifact was trained with it visible) + query."""
        rec = {"instruction": instruction or "-", "input": query, "output": ""}
        return self.template.encode(rec, with_prompt=instruction is not None, with_output=False)["input_ids"]

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        input_ids = torch.tensor([ids], device=self.distiller.gist.device)
        mask = make_attention_mask(input_ids, torch.ones_like(input_ids), self.distiller.gist_ids.tolist(), "gist",
                                   self.model.dtype)
        return self.distiller.student_logits(input_ids, mask, torch.arange(len(ids), device=input_ids.device)[None])[0]

    @torch.no_grad()
    def generate(self, query: str, instruction: str | None = None, max_new_tokens: int = 64) -> str:
        """Greedy answer. Without an instruction the gist embeddings stand in for the prompt."""
        ids = self.prompt_ids(query, instruction)
        out = []
        for _ in range(max_new_tokens):  # plain loop: exact under the gist mask, no cache subtleties
            nxt = int(self.logits(ids + out)[-1].argmax())
            if nxt == self.tok.eos_token_id:
                break
            out.append(nxt)
        return self.tok.decode(out, skip_special_tokens=True).strip()
