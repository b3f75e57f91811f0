"""Distill mode: frozen backbone, only k gist embeddings train, by KL to the full-prompt teacher.

The trainable part is one [k, hidden] parameter spliced in at the gist positions (PEFT prompt
tuning style); the backbone's vocabulary is never resized, so every backbone weight stays
bit-for-bit what it was.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions whose logits predict a response token (labels shifted by one)."""
    pos = torch.zeros_like(labels, dtype=torch.bool)
    pos[:, :-1] = labels[:, 1:] != IGNORE
    return pos


def kl_on_responses(teacher_rows, student_logits, student_labels, temperature: float):
    """Mean over response tokens of KL(teacher || student) at temperature T, scaled by T^2.
    teacher_rows: the teacher's logits at its response positions, in batch order."""
    t = teacher_rows.float() / temperature
    s = student_logits[response_positions(student_labels)].float() / temperature
    assert t.shape == s.shape, f"teacher/student response tokens differ: {t.shape} vs {s.shape}"
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return kl.mean() * temperature ** 2


class TeacherCache:
    """Teacher logits at response positions, kept per example when the data is fixed (the teacher
    is frozen, so they never change). Under ZeRO-3 every rank must run the same forwards, so the
    cache is used only when all ranks hit it (one all-reduce)."""

    def __init__(self):
        self.rows: dict = {}
        self.hits = self.misses = 0  # batches served from the cache / by a teacher forward

    def lookup(self, keys) -> torch.Tensor | None:
        from . import dist
        hit = keys is not None and all(k in self.rows for k in keys)
        if dist.all_reduce([float(hit)], op="min")[0] < 1:
            self.misses += 1
            return None
        self.hits += 1
        return torch.cat([self.rows[k] for k in keys])

    def store(self, keys, t_logits, labels_t):
        pos = response_positions(labels_t)
        for row, key in enumerate(keys):
            self.rows[key] = t_logits[row][pos[row]].detach().to("cpu", torch.bfloat16)


class GistDistiller(nn.Module):
    """Wraps a frozen causal LM; forward(teacher, student) returns the distillation loss."""

    def __init__(self, model, gist_ids: list[int], init: torch.Tensor, temperature=1.0, lm_weight=0.0,
                 cache_teacher=False):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.gist = nn.Parameter(init.clone())  # [k, hidden], the only trainable weights
        self.register_buffer("gist_ids", torch.tensor(gist_ids, device=init.device), persistent=False)
        self.temperature = temperature
        self.lm_weight = lm_weight
        self.teacher_cache = TeacherCache() if cache_teacher else None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the gist rows taken from the trainable parameter."""
        is_gist = torch.isin(input_ids, self.gist_ids)
        safe = torch.where(is_gist, torch.zeros_like(input_ids), input_ids)
        emb = self.model.get_input_embeddings()(safe)
        index = (input_ids - self.gist_ids[0]).clamp(0, len(self.gist_ids) - 1)
        return torch.where(is_gist[..., None], self.gist[index].to(emb.dtype), emb)

    def student_logits(self, input_ids, attention_mask, position_ids, **_):
        return self.model(inputs_embeds=self.embed(input_ids), attention_mask=attention_mask,
                          position_ids=position_ids).logits

    def teacher_rows(self, teacher: dict, labels_t: torch.Tensor, keys=None) -> torch.Tensor:
        cached = self.teacher_cache.lookup(keys) if self.teacher_cache is not None else None
        if cached is not None:
            return cached.to(labels_t.device)
        with torch.no_grad():
            t_logits = self.model(**teacher).logits
        if self.teacher_cache is not None and keys is not None:
            self.teacher_cache.store(keys, t_logits, labels_t)
        return t_logits[response_positions(labels_t)]

    def forward(self, teacher: dict, student: dict, labels_t: torch.Tensor, labels_s: torch.Tensor, keys=None):
        t_rows = self.teacher_rows(teacher, labels_t, keys)
        s_logits = self.student_logits(**student)
        loss = kl_on_responses(t_rows, s_logits, labels_s, self.temperature)
        if self.lm_weight:
            shift = s_logits[:, :-1].flatten(0, 1).float()
            lm = F.cross_entropy(shift, labels_s[:, 1:].flatten(), ignore_index=IGNORE)
            loss = (1 - self.lm_weight) * loss + self.lm_weight * lm
        return loss


def mean_embedding(model, gather=contextlib.nullcontext) -> torch.Tensor:
    w = model.get_input_embeddings().weight
    with gather([w]):
        return w.detach().float().mean(0).to(w.dtype).clone()


def parameter_digest(named_params, gather=contextlib.nullcontext) -> str:
    """sha256 over every (gathered) parameter's name and bytes: proves frozen weights unchanged."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(named_params, key=lambda item: item[0]):
        with gather([p]):
            h.update(name.encode())
            h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
