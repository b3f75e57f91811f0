"""`gist-dist compress`: distill one long prompt (e.g. a system prompt) into k gist embeddings.

No labelled data is needed: queries come from a file or are sampled from the frozen model itself,
and the answers are the frozen model's own greedy answers with the full prompt (the teacher).
The student sees only the gist tokens and the query (distill.student=no_prompt), so the trained
embeddings replace the prompt at inference.

With a tokenizer that has a chat template (data.template=chat_system): the prompt is the system
message, the query the user turn, the teacher's answer the assistant turn; the student has the gist
tokens in place of the system message's content (the template's fixed header stays). Without one:
the Alpaca layout. A query the teacher answers with nothing (eos first) is dropped and counted
(prompt.json: dropped_empty_answers): an empty answer teaches one eos and gives fidelity nothing
to compare, and many of them flag a broken template rather than a property of the prompt.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
from pathlib import Path

import torch

from . import dist
from .atomic import write_text
from .checks import Check, read_checks
from .config import ConfigError, RunConfig
from .data import DataError, GistTemplate
from .data.datagen import write_jsonl
from .data.sources import text_lines
from .inference import greedy
from .model import ROOT, load_model, load_tokenizer

DEFAULT_CONFIG = str(ROOT / "configs" / "compress.yaml")
QUERY_REQUEST = "\n\nWrite one short question a user could ask about the text above.\nQuestion:"
CHAT_QUERY_REQUEST = (
    "Write one short question a user could ask you, given your instructions. Reply with the question only."
)


def template_for(tok) -> str:
    """chat_system when the tokenizer has a chat template (prompt = system message), else alpaca."""
    return "chat_system" if getattr(tok, "chat_template", None) else "alpaca"


def read_queries(path: str) -> list[str]:
    queries = []
    for lineno, line in enumerate(text_lines(path, "queries"), 1):
        line = line.strip()
        if line.startswith("{"):
            try:
                line = json.loads(line)["query"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f'{path}:{lineno}: expected a plain line or {{"query": ...}}') from None
        if line:
            queries.append(str(line))
    if not queries:
        raise DataError(f"{path}: no queries")
    return queries


@torch.no_grad()
def _sample(model, tok, ids: list[int], max_new: int) -> list[int]:
    """One sampled continuation (top-k 50): a query the model itself might ask."""
    device = next(model.parameters()).device
    out = model.generate(
        torch.tensor([ids], device=device),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
        max_new_tokens=max_new,
        do_sample=True,
        top_k=50,
        temperature=1.0,
        top_p=None,
        pad_token_id=tok.pad_token_id,
    )
    return out[0, len(ids) :].tolist()


def sample_queries(model, tok, template, prompt: str, n: int) -> list[str]:
    """Distinct one-line questions sampled from the frozen model itself."""
    if template.chat:  # the model, holding the prompt as its system message, asked for a user's question
        ask = template.encode(
            {"instruction": prompt, "input": CHAT_QUERY_REQUEST, "output": ""}, with_gist=False, with_output=False
        )["input_ids"]
    else:
        ask = template.text_ids(prompt + QUERY_REQUEST)
    queries: list[str] = []
    for tries in range(1, n * 3 + 1):
        text = tok.decode(_sample(model, tok, ask, 24), skip_special_tokens=True)
        text = text.strip().split("\n")[0].strip()
        if text and text not in queries:
            queries.append(text)
            if len(queries) % 8 == 0 or len(queries) == n:
                print(f"compress: sampled {len(queries)}/{n} distinct queries ({tries} tries)", flush=True)
        if len(queries) == n:
            break
    return queries


def teacher_records(
    cfg: RunConfig,
    prompt: str,
    queries: list[str] | None,
    n_queries: int,
    answer_tokens: int,
    heldout_queries: list[str] = (),
) -> tuple[list[dict], int]:
    """(records {instruction: prompt, input: query, output: the teacher's greedy answer}, how many
    queries were dropped for an empty answer): the training queries (sampled when None), then the
    held-out ones. Every rank answers its share of the queries; all ranks return the same records
    in query order."""
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model).eval()  # replicated, inference only; freed before training
    template = GistTemplate(tok, [], max_length=1 << 30, template=template_for(tok))
    if queries is None:
        queries = sample_queries(model, tok, template, prompt, n_queries) if dist.is_main() else None
        queries = dist.all_gather_object(queries)[0]
        queries = [q for q in queries if q not in heldout_queries]
        if len(queries) < 4:
            raise DataError("compress: the model produced too few distinct queries; pass --queries FILE")
    queries = [*queries, *heldout_queries]
    mine, share = [], queries[dist.rank() :: dist.world()]
    dist.log(f"compress: the full-prompt model answers {len(queries)} queries ({answer_tokens} tokens at most each)")
    for q in share:  # one at a time: no padding, the same answer at any world size
        ids = template.encode({"instruction": prompt, "input": q, "output": ""}, with_gist=False, with_output=False)[
            "input_ids"
        ]
        (answer,), _ = greedy(
            model, [ids[:-1]], [ids[-1:]], [], "pos_control", answer_tokens, tok.eos_token_id, tok.pad_token_id
        )
        mine.append(tok.decode(answer, skip_special_tokens=True).strip())
        if len(mine) % 8 == 0 or len(mine) == len(share):
            dist.log(f"compress: answered {len(mine)}/{len(share)} of rank 0's share")
    del model  # the teacher's weights and the allocator's cache go before the student is built
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    shares = dist.all_gather_object(mine)
    answers = [shares[i % dist.world()][i // dist.world()] for i in range(len(queries))]
    records = [{"instruction": prompt, "input": q, "output": a} for q, a in zip(queries, answers) if a]
    if len(records) < 2:
        raise DataError(
            f"compress: the teacher answered {len(queries) - len(records)} of {len(queries)} queries "
            f"with nothing; too few left to train and hold out"
        )
    return records, len(queries) - len(records)


def _queries_sha256(queries, n_queries: int, heldout: float, heldout_queries, checks=()) -> str:
    """What decides the teacher data besides the prompt: a rerun with other queries or checks makes new data."""
    split = {"heldout_queries": heldout_queries} if heldout_queries else {"heldout": heldout}
    split["checks"] = [c.as_dict() for c in checks]
    return hashlib.sha256(json.dumps([queries if queries is not None else n_queries, split]).encode()).hexdigest()


def _same_prompt_data(data_dir: Path, prompt: str, num_gist: int, template: str, queries_sha256: str) -> bool:
    meta = data_dir / "prompt.json"
    if not meta.is_file() or not (data_dir / "heldout.jsonl").is_file():
        return False
    saved = json.loads(meta.read_text())
    return (
        saved.get("prompt_sha256") == hashlib.sha256(prompt.encode()).hexdigest()
        and saved.get("num_gist") == num_gist
        and saved.get("template", "alpaca") == template
        and saved.get("queries_sha256") == queries_sha256
    )


def _write_teacher_data(
    cfg,
    data_dir: Path,
    prompt: str,
    queries,
    n_queries: int,
    answer_tokens: int,
    heldout: float,
    heldout_queries: list[str] = (),
    checks: list[Check] = (),
):
    """All ranks answer; rank 0 writes. prompt.json goes last: it marks the data complete. With
    heldout_queries, those are the held-out split (never trained on); else the last `heldout` share.
    The queries of the task checks are held out too, either way."""
    check_queries = [c.query for c in checks if c.query not in heldout_queries]
    held = set(heldout_queries) | set(check_queries)
    records, dropped = teacher_records(
        cfg, prompt, queries, n_queries, answer_tokens, [*heldout_queries, *check_queries]
    )
    train, evals = [r for r in records if r["input"] not in held], [r for r in records if r["input"] in held]
    if not heldout_queries and train:
        n_eval = max(1, int(len(train) * heldout))
        train, evals = train[:-n_eval], train[-n_eval:] + evals
    if not train or not evals:
        raise DataError(
            f"compress: the teacher answered every {'training' if not train else 'held-out'} "
            f"query with nothing; none left to {'train on' if not train else 'hold out'}"
        )
    if not dist.is_main():
        return
    write_jsonl(train, data_dir / "train.jsonl")
    write_jsonl(evals, data_dir / "heldout.jsonl")
    if checks:
        write_text(data_dir / "checks.jsonl", "".join(json.dumps(c.as_dict()) + "\n" for c in checks))
    else:
        (data_dir / "checks.jsonl").unlink(missing_ok=True)
    tok = load_tokenizer(cfg.model)
    prompt_tokens = len(tok(prompt, add_special_tokens=False)["input_ids"])
    (data_dir / "prompt.json").write_text(
        json.dumps(
            {
                "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
                "prompt_tokens": prompt_tokens,
                "num_gist": cfg.num_gist,
                "compression_ratio": prompt_tokens / cfg.num_gist,
                "template": template_for(tok),
                "queries": len(records) + dropped,
                "dropped_empty_answers": dropped,
                "answer_tokens": answer_tokens,
                "heldout_queries": len(evals),
                "checks": len(checks),
                "queries_sha256": _queries_sha256(queries, n_queries, heldout, heldout_queries, checks),
            },
            indent=2,
        )
    )


def prepare(
    cfg: RunConfig,
    prompt_file: str,
    queries_file: str | None,
    n_queries: int,
    answer_tokens: int,
    heldout: float,
    heldout_file: str | None = None,
    checks_file: str | None = None,
) -> RunConfig:
    """Make the teacher data (all ranks answer, rank 0 writes), then return the distill run config that trains on it."""
    p = Path(prompt_file)
    if not p.is_file():
        raise DataError(f"{prompt_file}: prompt file not found")
    prompt = p.read_text(encoding="utf-8", errors="strict").strip()
    if not prompt:
        raise DataError(f"{prompt_file}: prompt is empty")
    if not 0 < heldout < 1:
        raise ConfigError("--heldout must be between 0 and 1")
    queries = read_queries(queries_file) if queries_file else None
    heldout_queries = read_queries(heldout_file) if heldout_file else []
    checks = read_checks(checks_file) if checks_file else []
    training = set(queries or ())
    for source, held in ((heldout_file, heldout_queries), (checks_file, [c.query for c in checks])):
        both = [q for q in held if q in training]
        if both:
            raise DataError(
                f"{source}: {len(both)} held-out queries are also training queries in {queries_file} "
                f"(first: {both[0]!r}); a held-out query must not be trained on"
            )
    data_dir = Path(cfg.output_dir) / "compress_data"
    dist.init(cfg.timeout_s)
    tok = load_tokenizer(cfg.model)
    kind = template_for(tok)
    if _same_prompt_data(
        data_dir, prompt, cfg.num_gist, kind, _queries_sha256(queries, n_queries, heldout, heldout_queries, checks)
    ):
        dist.log(f"gist-dist: reusing teacher data in {data_dir} (same prompt and queries; e.g. a requeued job)")
    else:
        _write_teacher_data(cfg, data_dir, prompt, queries, n_queries, answer_tokens, heldout, heldout_queries, checks)
    dist.barrier()
    # The teacher sees the whole prompt: make room for the longest teacher example.
    longest, template = 0, GistTemplate(tok, [], max_length=1 << 30, template=kind)
    for line in (data_dir / "train.jsonl").read_text().splitlines():
        longest = max(longest, len(template.encode(json.loads(line), with_gist=False)["input_ids"]))
    data = dataclasses.replace(
        cfg.data,
        max_length=max(cfg.data.max_length, longest + cfg.num_gist),
        train=str(data_dir / "train.jsonl"),
        eval=str(data_dir / "heldout.jsonl"),
        num_train=0,
        num_eval=0,
        template=kind,
    )
    # one fixed prompt and data set: the teacher runs once per example (cache_teacher)
    distill = dataclasses.replace(cfg.distill, student="no_prompt", cache_teacher=True)
    return dataclasses.replace(cfg, objective="distill", mask="gist", data=data, distill=distill).validate()


def record_prompt_meta(cfg: RunConfig):
    """Fold the prompt's hash and token count into gist_config.json."""
    if not dist.is_main():
        return
    out = Path(cfg.output_dir)
    meta = json.loads((out / "gist_config.json").read_text())
    meta.update(json.loads((out / "compress_data" / "prompt.json").read_text()))
    write_text(out / "gist_config.json", json.dumps(meta, indent=2, sort_keys=True))


def plan_line(cfg: RunConfig) -> str:
    """What compress is about to train, in one line (the progress lines then give an eta)."""
    meta = json.loads((Path(cfg.data.train).parent / "prompt.json").read_text())
    trains = {
        "embeddings": "gist embeddings",
        "offsets": "gist embeddings and a per-layer offset each",
        "kv": "gist tokens' keys and values at every layer",
    }[cfg.distill.params]
    trained_on = meta["queries"] - meta["heldout_queries"] - meta["dropped_empty_answers"]
    checks = f", {meta['checks']} task checks" if meta.get("checks") else ""
    return (
        f"compress: {cfg.num_gist} {trains} for a {meta['prompt_tokens']}-token prompt "
        f"({meta['compression_ratio']:.0f}x), {cfg.train.max_steps} steps of {cfg.train.micro_batch_size} "
        f"queries per rank x {dist.world()} rank(s) at lr {cfg.train.lr:g} on {trained_on} teacher answers; "
        f"{meta['heldout_queries']} held out{checks}"
    )
