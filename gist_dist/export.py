"""`gist-dist export`: a no-prompt distill/compress artifact in the forms other tools load.

    gist-dist export RUN_DIR --peft DIR            # PEFT PromptTuning adapter
    gist-dist export RUN_DIR --prompt-embeds FILE  # [k, hidden] tensor + the token layout after it

Why only no-prompt artifacts: their student saw `<gist rows> + "\\nInput: {query}\\nOutput:"` under
plain causal attention (nothing precedes the gist, so the gist mask blocks nothing), which is exactly
what PEFT prompt tuning and vLLM's `prompt_embeds` compute. A gist_mask student needs the
instruction before the gist and the gist mask, which neither tool has.

PEFT:  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)
       model(**tok("\\nInput: When are you open?\\nOutput:", add_special_tokens=False, return_tensors="pt"))
vLLM (unverified here: vLLM cannot be installed on these machines):
       embeds = torch.cat([load_file(FILE)["gist"], base.get_input_embeddings()(tail_ids)])
       llm.generate({"prompt_embeds": embeds.to(dtype)})   # with enable_prompt_embeds=True
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import artifact
from .artifact import ArtifactError
from .atomic import atomic_dir, replace_file

TAIL_TEMPLATE = "\nInput: {query}\nOutput:"  # the alpaca template's tail: what follows the gist rows


def _no_prompt_artifact(run_dir: str | Path) -> tuple[torch.Tensor, dict]:
    gist, meta = artifact.load(run_dir)
    student = meta.get("student", "no_prompt" if "prompt_sha256" in meta else "unknown")
    if student != "no_prompt":
        raise ArtifactError(
            f"{run_dir}: its gist embeddings were trained with the instruction visible "
            f"(distill.student={student}); only no-prompt artifacts (compress, "
            f"distill.student=no_prompt) stand alone as a prompt-tuning adapter"
        )
    if meta.get("params", "embeddings") != "embeddings":
        raise ArtifactError(
            f"{run_dir}: it was trained with distill.params={meta['params']} (what trains reaches past the input "
            f"rows); PEFT prompt tuning and prompt_embeds carry input rows only"
        )
    before, _ = _text_around_gist(meta)
    if before:
        why = (
            "which every later token saw (mask_prefix=visible), but PEFT prompt tuning and prompt_embeds put the "
            "gist rows first"
            if meta.get("mask_prefix_tokens")
            else "which the student saw only from the gist tokens; PEFT prompt tuning and prompt_embeds attend "
            "causally, so they would not reproduce it"
        )
        raise ArtifactError(
            f"{run_dir}: its template ({meta.get('template')}) puts {before!r} before the gist rows, {why}"
        )
    return gist, meta


def _base_model(run_dir, model_name: str | None):
    """The base model, checked against the artifact's fingerprint (inference.load_run)."""
    from .config import ModelConfig
    from .inference import load_run

    run = load_run(run_dir, ModelConfig(name=model_name or "", dtype="fp32"))
    return run.model, run.source.split(" + ")[0]


def _text_around_gist(meta: dict) -> tuple[str, str]:
    """(fixed text before the gist rows, the text after them with a {query} slot) in the artifact's
    template: ("", TAIL_TEMPLATE) for alpaca on a model without BOS; a chat header for compress on
    chat models."""
    from .config import ModelConfig
    from .data import GistTemplate
    from .model import load_tokenizer

    tok = load_tokenizer(ModelConfig(name=meta["base_model"], tokenizer=meta.get("tokenizer", "")))
    t = GistTemplate(tok, [], 1 << 30, template=meta.get("template") or "alpaca")
    tail = t.pieces({"instruction": "-", "input": "{query}", "output": ""})[1]
    return tok.decode(t.prefix), tok.decode(tail)


def export_peft(run_dir: str | Path, out_dir: str | Path, model_name: str | None = None) -> Path:
    """Write a PEFT PromptTuning adapter (adapter_config.json + adapter_model.safetensors) via PEFT itself."""
    from peft import PromptTuningConfig, TaskType, get_peft_model

    gist, meta = _no_prompt_artifact(run_dir)
    base, base_name = _base_model(run_dir, model_name)
    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=gist.shape[0],
        token_dim=gist.shape[1],
        base_model_name_or_path=base_name,
    )
    model = get_peft_model(base, peft_config)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(gist)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        (tmp / "gist_layout.json").write_text(json.dumps(_layout(meta), indent=2))
    return out


def export_prompt_embeds(run_dir: str | Path, path: str | Path) -> Path:
    """The [k, hidden] rows as safetensors ("gist"), the layout that must follow them in the metadata."""
    gist, meta = _no_prompt_artifact(run_dir)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"gist": gist.float().contiguous()}, str(tmp), metadata={"layout": json.dumps(_layout(meta))})
    replace_file(tmp, path)
    return path


def _layout(meta: dict) -> dict:
    """How to place the rows: the k gist rows first, then the embeddings of `then_text`."""
    return {
        "gist_rows_first": True,
        "num_gist": meta["num_gist"],
        "then_text": _text_around_gist(meta)[1],
        "template": meta.get("template") or "alpaca",
        "add_special_tokens": False,
        "attention": "causal",
        "base_model": meta.get("base_model"),
        "base_fingerprint": meta.get("base_fingerprint"),
    }
