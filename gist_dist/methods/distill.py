"""objective=distill: the backbone is frozen and only k gist embeddings train, by KL to the teacher
(the same frozen model seeing the full prompt) on the response tokens.

The trainable part is one [k, hidden] parameter spliced in at the gist positions (tokens.GistEmbedding),
with distill.params=offsets one more per decoder layer (tokens.GistLayerOffsets), and with params=kv the
gist positions' keys and values at every layer instead (tokens.GistKV: what the gist cache keeps);
the backbone's vocabulary is never resized, so every backbone weight stays bit-for-bit what it was
(checked with digests of the gathered weights when train.verify_frozen is on). The student sees the
prompt + gist under the gist mask (distill.student=gist_mask) or only the gist (no_prompt, compress).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import artifact, dist, zero
from ..config import ConfigError
from ..data import IGNORE
from ..data.batches import ShardedBatches
from ..data.packing import join, pack
from ..inference.causal import build_cache
from ..masks import model_inputs
from ..tokens import GistEmbedding, GistKV, GistLayerOffsets, mean_embedding
from .base import Method, label_tokens
from .finetune import label_targets, labelled_rows, lm_head_rows


def kl_on_responses(teacher_rows, student_rows, temperature: float):
    """Sum over response tokens of KL(teacher || student) at temperature T, scaled by T^2 (rows in batch order)."""
    assert teacher_rows.shape == student_rows.shape, (
        f"teacher/student response tokens differ: {teacher_rows.shape} vs {student_rows.shape}"
    )
    t, s = teacher_rows.float(), student_rows.float()
    if temperature != 1:  # no [tokens, vocab] copies when there is nothing to scale
        t, s = t / temperature, s / temperature
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") * temperature**2


class TeacherCache:
    """Teacher logits at response positions, kept per example when the data is fixed (the teacher
    is frozen, so they never change). Under ZeRO-3 every rank must run the same forwards, so the
    cache is used only when all ranks hit it (one all-reduce)."""

    def __init__(self):
        self.rows: dict = {}
        self.hits = self.misses = 0  # batches served from the cache / by a teacher forward

    def lookup(self, keys) -> torch.Tensor | None:
        hit = keys is not None and all(k in self.rows for k in keys)
        if dist.all_reduce([float(hit)], op="min")[0] < 1:
            self.misses += 1
            return None
        self.hits += 1
        return torch.cat([self.rows[k] for k in keys])

    def store(self, keys, rows: torch.Tensor, counts: list[int]):
        for key, part in zip(keys, rows.split(counts)):
            self.rows[key] = part.detach().to("cpu", torch.bfloat16)


class DistillLoss(nn.Module):
    """Wraps a frozen causal LM; forward(teacher, student, labels_t, labels_s) returns the distillation
    loss summed over the response tokens."""

    def __init__(
        self, model, gist_ids: list[int], init: torch.Tensor, temperature=1.0, lm_weight=0.0, cache_teacher=False
    ):
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.gist_rows = GistEmbedding(gist_ids, init)  # the only trainable weights
        self.temperature, self.lm_weight = temperature, lm_weight
        self.teacher_cache = TeacherCache() if cache_teacher else None

    def response_logits(self, labels, input_ids=None, inputs_embeds=None, **masks) -> torch.Tensor:
        """Logits only at the positions that predict a response token, [tokens, vocab]."""
        hidden = self.model.get_decoder()(
            input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False, **masks
        ).last_hidden_state
        return lm_head_rows(self.model, labelled_rows(hidden, labels)[0])

    def teacher_rows(self, teacher: dict, labels_t: torch.Tensor, keys=None) -> torch.Tensor:
        cached = self.teacher_cache.lookup(keys) if self.teacher_cache is not None else None
        if cached is not None:
            return cached.to(labels_t.device)
        with torch.no_grad():
            rows = self.response_logits(labels_t, **teacher)
        if self.teacher_cache is not None and keys is not None:
            self.teacher_cache.store(keys, rows, (labels_t[:, 1:] != IGNORE).sum(-1).tolist())
        return rows

    def forward(self, teacher: dict, student: dict, labels_t: torch.Tensor, labels_s: torch.Tensor, keys=None):
        t_rows = self.teacher_rows(teacher, labels_t, keys)
        masks = {k: v for k, v in student.items() if k != "input_ids"}
        embeds = self.gist_rows(student["input_ids"], self.model.get_input_embeddings())
        s_rows = self.response_logits(labels_s, inputs_embeds=embeds, **masks)
        loss = kl_on_responses(t_rows, s_rows, self.temperature)
        if self.lm_weight:
            lm = F.cross_entropy(s_rows.float(), label_targets(labels_s), reduction="sum")
            loss = (1 - self.lm_weight) * loss + self.lm_weight * lm
        return loss


def _keep_answer_tokens(example: dict, keep: int) -> dict:
    extra = sum(lab != IGNORE for lab in example["labels"]) - keep
    if extra <= 0:
        return example
    return {**example, "input_ids": example["input_ids"][:-extra], "labels": example["labels"][:-extra]}


def parameter_digest(named_params) -> str:
    """sha256 over every (gathered) parameter's name and bytes: proves frozen weights unchanged."""
    h = hashlib.sha256()
    for name, p in sorted(named_params, key=lambda item: item[0]):
        with zero.gather([p]):
            h.update(name.encode())
            h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Distill(Method):
    name = "distill"
    trains_backbone = False  # the frozen backbone is rebuilt from the base model on resume
    loss_module = DistillLoss  # what wraps the frozen model (the encoder-decoder family swaps it)

    @classmethod
    def check(cls, cfg):
        # here, not in RunConfig.validate: compress loads a config and sets the student afterwards
        if cfg.distill.params == "kv" and cfg.distill.student != "no_prompt":
            raise ConfigError(
                "distill.params=kv trains one fixed cache, so the student must not see a prompt: set "
                "distill.student=no_prompt (gist-dist compress does)"
            )

    def encode(self, template, records, stats, split):
        # mask_prefix=visible: the student's leading template tokens (the fixed head before the
        # instruction, or with no_prompt what stays before the gist: BOS / chat header) stay visible.
        with_prompt = self.cfg.distill.student == "gist_mask"
        head = template.fixed_head if with_prompt else template.prefix
        self.prefix = len(head) if self.cfg.mask_prefix == "visible" else 0
        if split == "train" and self.cfg.distill.params == "kv" and len(records):
            # params=kv starts from the gist entries the frozen model writes after reading the prompt (wrap),
            # and the artifact's cache is the student's own prefix + gist (export)
            read = template.encode(records[0], with_output=False)["input_ids"]
            self.kv_reading = read[: max(i for i, t in enumerate(read) if t in self.tokens.gist_ids) + 1]
            self.kv_student_head = template.prefix + self.tokens.gist_ids
        out = []
        for rec in records:
            teacher = template.encode(rec, stats, with_gist=False)
            student = template.encode(rec, stats, with_prompt=with_prompt)
            if teacher is not None and student is not None:
                # Truncation can leave the two with different answer lengths (the teacher's head holds
                # the prompt, a gist_mask student's holds prompt + gist): the KL compares the same
                # answer tokens, so both keep the shorter answer.
                keep = min(sum(lab != IGNORE for lab in e["labels"]) for e in (teacher, student))
                teacher, student = (_keep_answer_tokens(e, keep) for e in (teacher, student))
                out.append({"teacher": teacher, "student": student, "key": f"{split}:{len(out)}"})
        return out

    def pack(self, examples, capacity):
        """Teacher and student packed alike: one row holds the same examples on both sides."""

        def combine(parts):
            return {
                "teacher": join([p["teacher"] for p in parts]),
                "student": join([p["student"] for p in parts]),
                "key": "+".join(p["key"] for p in parts),
            }

        return pack(
            examples, capacity, lambda e: max(len(e["teacher"]["input_ids"]), len(e["student"]["input_ids"])), combine
        )

    def targets(self, examples):
        return sum(label_tokens(e["student"]) for e in examples)

    def batches(self, examples, batch_size, rank, world, seed):
        # With the teacher cache, each example stays on one rank (shuffled within it), so after one
        # epoch every rank finds all its teacher rows in its own cache.
        return ShardedBatches(examples, batch_size, rank, world, seed, pinned=self.cfg.distill.cache_teacher)

    def collate(self, examples, device):
        teacher, labels_t = self.model_batch([e["teacher"] for e in examples], "pos_control", device)
        student, labels_s = self.model_batch([e["student"] for e in examples], "gist", device)
        return {
            "teacher": teacher,
            "student": student,
            "labels_t": labels_t,
            "labels_s": labels_s,
            "keys": [e["key"] for e in examples] if self.cfg.distill.cache_teacher else None,
        }, sum(len(e["student"]["input_ids"]) for e in examples)

    def wrap(self, model):
        d = self.cfg.distill
        init = mean_embedding(model, zero.gather).expand(self.cfg.num_gist, -1)
        module = self.loss_module(model, self.tokens.gist_ids, init, d.temperature, d.lm_weight, d.cache_teacher)
        decoder = model.get_decoder()  # encoder-decoder models are refused by their method's check
        if d.params == "offsets":
            if not hasattr(decoder, "layers"):
                raise ConfigError(
                    f"distill.params=offsets: {model.config.model_type}'s decoder keeps no .layers to hook"
                )
            zeros = torch.zeros(len(decoder.layers) - 1, *init.shape, dtype=init.dtype, device=init.device)
            module.gist_rows.offsets = GistLayerOffsets(decoder, zeros)  # zeros: training starts as plain prompt tuning
        if d.params == "kv":
            try:
                kv = self.untrained_gist_kv(model, module.gist_rows)
                module.gist_rows.kv = GistKV(decoder, kv[:, 0], kv[:, 1])
            except ValueError as e:
                raise ConfigError(f"distill.params=kv: {model.config.model_type}: {e}") from None
            module.gist_rows.gist.requires_grad_(False)  # the gist entries replace all the input row could change
            return module, list(module.gist_rows.kv.parameters())
        return module, list(module.gist_rows.parameters())

    def untrained_gist_kv(self, model, rows: GistEmbedding) -> torch.Tensor:
        """[layers, 2, k, kv_dim]: each layer's k_proj / v_proj output at the gist positions when the frozen
        model reads the first training record's prompt and then the gist tokens (their initial rows) under
        the gist mask: the untrained gist cache, where params=kv training starts. Under ZeRO-3 the model is
        gathered whole for this one forward (read-only)."""
        ids = torch.tensor([self.kv_reading], device=rows.gist.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        inputs = model_inputs(batch, self.tokens.gist_ids, "gist", self.dtype, prefix=self.prefix)
        decoder = model.get_decoder()
        with zero.gather([*model.parameters(), *rows.parameters()], read_only=True):
            inputs["inputs_embeds"] = rows(inputs.pop("input_ids"), model.get_input_embeddings())
            return GistKV.capture(decoder, lambda: decoder(**inputs, use_cache=False), torch.isin(ids, rows.gist_ids))

    def start(self, module):
        embedding = module.model.get_input_embeddings().weight
        with zero.gather([embedding]):
            meta = {"base_fingerprint": artifact.model_fingerprint(module.model.config, embedding)}
        if self.cfg.train.verify_frozen:  # costs one gather of every weight; proves the backbone never moved
            meta["frozen_digest_before"] = parameter_digest(module.model.named_parameters())
        return meta

    def finish(self, module, meta):
        out = {}
        if self.cfg.train.verify_frozen:
            out["frozen_digest_after"] = parameter_digest(module.model.named_parameters())
            if out["frozen_digest_after"] != meta["frozen_digest_before"]:
                raise RuntimeError("distill: a frozen backbone weight changed during training")
            out["frozen_digest_before"] = meta["frozen_digest_before"]
        cache = module.teacher_cache
        out["teacher_cache"] = cache and {"hits": cache.hits, "misses": cache.misses}
        return out

    def export(self, engine, module, out, meta, last_loss):
        """OUTPUT_DIR/gist.safetensors + gist_config.json: the artifact `gist-dist generate` loads."""
        rows = module.gist_rows
        with zero.gather(list(rows.parameters())):
            gist = rows.gist.detach().clone()
            offsets = rows.offsets.stacked().clone() if rows.offsets is not None else None
            kv = rows.kv.stacked().clone() if rows.kv is not None else None
        cache = None
        if kv is not None:  # every rank runs the forward (ZeRO-3); the cache those entries make, for serving
            embedding = module.model.get_input_embeddings()
            head = [self.kv_student_head]
            cache = build_cache(
                module.model,
                head,
                self.tokens.gist_ids,
                "gist",
                embed=lambda ids: rows(ids, embedding),
                prefix=self.prefix,
            )
        if dist.is_main():
            cfg, tok = self.cfg, self.tokens.tokenizer
            if cache is not None:
                cache.save(Path(out) / artifact.CACHE, meta={"base_model": cfg.model.name, "num_gist": cfg.num_gist})
            artifact.save(
                out,
                gist,
                layer_offsets=offsets,
                kv=kv,
                meta={
                    "base_fingerprint": meta["base_fingerprint"],
                    "base_model": cfg.model.name,
                    "num_gist": cfg.num_gist,
                    "gist_tokens": tok.convert_ids_to_tokens(self.tokens.gist_ids),
                    "hidden_size": gist.shape[1],
                    "tokenizer": cfg.model.tokenizer or cfg.model.name,
                    "final_loss": last_loss,
                    "temperature": cfg.distill.temperature,
                    "student": cfg.distill.student,
                    "template": cfg.data.template,
                    "mask_prefix_tokens": self.prefix,
                },
            )
