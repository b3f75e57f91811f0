"""Nothing of the user's data is dropped unless asked; metrics reach TensorBoard; progress in plain logs."""
from __future__ import annotations

import json

import pytest

from conftest import TINY, gist_dist, torchrun
from gist_dist.config import load_config
from gist_dist.data import DataStats, load_records


def _records(n: int) -> list[dict]:
    return [{"instruction": f"Repeat the number {i}.", "input": "", "output": str(i)} for i in range(n)]


def test_every_record_of_a_file_is_used_by_default(tmp_path):
    path = tmp_path / "big.jsonl"  # more than the old silent default of 2000
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(2500)))
    cfg = load_config(TINY, [f"data.train={path}", "data.num_train=0", "data.num_eval=0"])
    assert load_config(None).data.num_train == 0 and load_config(None).data.num_eval == 0
    stats = DataStats()
    records = load_records(str(path), n=cfg.data.num_train, stats=stats)
    assert len(records) == 2500 and records[-1]["output"] == "2499"
    assert (stats.records, stats.source_records) == (2500, 2500)


def test_a_limit_is_applied_only_when_asked_and_counted(tmp_path):
    path = tmp_path / "big.json"
    path.write_text(json.dumps(_records(300)))
    stats = DataStats()
    records = load_records(str(path), n=100, stats=stats)
    assert [r["output"] for r in records] == [str(i) for i in range(100)]  # the first 100, in order
    assert (stats.records, stats.source_records) == (100, 300)


def test_log_backends_are_validated():
    from gist_dist.config import ConfigError
    with pytest.raises(ConfigError, match="unknown backend"):
        load_config(TINY, ["log.backends=jsonl,mlflow"])
    with pytest.raises(ConfigError, match="must include jsonl"):
        load_config(TINY, ["log.backends=tensorboard"])
    assert load_config(TINY, ["log.backends=jsonl,tensorboard"]).log.backends == ["jsonl", "tensorboard"]


def test_missing_logger_package_fails_before_anything_is_written(tmp_path):
    pytest.importorskip("tensorboard")  # the test environment has tensorboard, not wandb
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    out = tmp_path / "run"
    proc = gist_dist(["train", TINY, f"output_dir={out}", "log.backends=jsonl,wandb"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gist-dist: config error: log.backends has wandb")
    assert not out.exists()


def test_wandb_sink_is_offline_and_gets_the_scalars_of_metrics_jsonl(tmp_path, monkeypatch):
    """wandb is not installed here: a stand-in module records what the sink calls (init, log, finish)."""
    import os
    import sys
    import types

    from gist_dist.metrics_log import MetricsLog, scalars
    calls = {"log": []}

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"], calls["mode"] = kwargs, os.environ.get("WANDB_MODE")
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(TINY, ["log.backends=jsonl,wandb", f"output_dir={tmp_path}"])
    log = MetricsLog(cfg, main=True, fresh=True)
    steps = [{"step": 1, "loss": 2.5, "rank_tokens_per_s": [10.0, 12.0], "lr": 1e-4}, {"step": 2, "loss": 2.0, "lr": 1e-4}]
    log.record({"event": "start"})
    for r in steps:
        log.record(r)
    log.close()
    assert calls["mode"] == "offline" and calls["init"]["dir"] == str(tmp_path) and calls.get("finished")
    assert calls["init"]["config"]["log"]["backends"] == ["jsonl", "wandb"]
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert calls["log"] == [(r["step"], scalars(r)) for r in written if "step" in r] and len(calls["log"]) == 2
    assert calls["log"][0][1]["rank1/tokens_per_s"] == 12.0


@pytest.mark.parametrize("mode", ["bar", "lines"])
def test_progress_is_a_bar_or_plain_lines(mode, capsys):
    from gist_dist.metrics_log import Progress
    progress = Progress(total=4, initial=0, every=2, main=True, desc="train[gist]", mode=mode)
    for step in range(1, 5):
        progress.update(step, loss=1.0 / step, tokens_per_s=10.0, step_time=0.5)
    progress.close()
    err = capsys.readouterr().err
    if mode == "bar":  # tqdm redraws one line with carriage returns
        assert "\r" in err and "4/4" in err
    else:  # a Slurm output file: one line every 2 steps, no carriage return
        assert "\r" not in err and err.splitlines() == [
            "train[gist] step 2/4 loss 0.5000 tokens/s 10.0 step_time 0.50s",
            "train[gist] step 4/4 loss 0.2500 tokens/s 10.0 step_time 0.50s"]


def test_two_rank_run_logs_the_same_scalars_to_tensorboard_and_plain_progress_lines(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = torchrun(["train", TINY, f"output_dir={out}", "train.max_steps=4", "train.log_every=2",
                     "log.backends=jsonl,tensorboard", "data.num_train=64"])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["data"]["records"] == 64 and start["data"]["source_records"] == 64
    assert "train records: 64 used of 64" in proc.stderr + proc.stdout
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # rank 0 only
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in steps}, rel=1e-6)
    assert [e.step for e in acc.Scalars("rank1/tokens_per_s")] == [1, 2, 3, 4]
    # Not a terminal: one plain line per log_every steps, no carriage-return bars.
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train[gist] step")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"]
    assert "\r" not in proc.stderr


@pytest.fixture(scope="module")
def no_prompt_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("no_prompt")
    gist_dist(["train", TINY, f"output_dir={out}", "mode=distill", "distill.student=no_prompt", "num_gist=2",
               "train.max_steps=3", "data.num_train=32", "train.lr=0.05", "train.verify_frozen=false"])
    return out


def test_peft_adapter_gives_the_logits_and_answers_of_gist_dist_generate(no_prompt_artifact, tmp_path):
    """The adapter on a freshly loaded plain base (no gist rows in its vocabulary): the logits of the
    teacher-forced gist path, and the greedy answer of the cached path `gist-dist generate` takes."""
    peft = pytest.importorskip("peft")
    import torch

    from gist_dist.inference import GistModel
    from gist_dist.model import load_model
    adapter = tmp_path / "adapter"
    gist_dist(["export", str(no_prompt_artifact), "--peft", str(adapter)])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"
    gm = GistModel.load(no_prompt_artifact)
    query = "Repeat the word apple."
    ids = gm.prompt_ids(query)  # gist ids + "\nInput: ...\nOutput:"
    ours = gm.logits(ids)[2:]  # the positions after the 2 gist tokens
    base = load_model(load_config(TINY).model).eval()
    assert base.get_input_embeddings().weight.shape[0] <= min(gm.run.gist_ids)  # a plain base: no gist rows
    model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    tail = gm.tok("\nInput: " + query + "\nOutput:", add_special_tokens=False, return_tensors="pt")
    assert tail["input_ids"][0].tolist() == ids[2:]
    with torch.no_grad():
        theirs = model(**tail).logits[0, -len(ids) + 2:]
        new = []  # greedy on the adapter's full forward each step (PEFT's own generate is not what is tested)
        for _ in range(8):
            seq = torch.tensor([ids[2:] + new])
            new.append(int(model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1].argmax()))
            if new[-1] == gm.tok.eos_token_id:
                break
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert gm.tok.decode(new, skip_special_tokens=True).strip() == gm.generate(query, max_new_tokens=8)


def test_prompt_embeds_export_holds_the_rows_and_the_layout(no_prompt_artifact, tmp_path):
    from safetensors import safe_open

    from gist_dist import artifact
    path = tmp_path / "gist_embeds.safetensors"
    gist_dist(["export", str(no_prompt_artifact), "--prompt-embeds", str(path)])
    with safe_open(str(path), "pt") as fh:
        layout = json.loads(fh.metadata()["layout"])
        rows = fh.get_tensor("gist")
    gist, meta = artifact.load(no_prompt_artifact)
    assert rows.equal(gist.float()) and rows.shape[0] == 2
    assert layout["then_text"] == "\nInput: {query}\nOutput:" and layout["base_fingerprint"] == meta["base_fingerprint"]


def test_export_refuses_a_gist_mask_artifact(tmp_path):
    import torch

    from gist_dist import artifact
    artifact.save(tmp_path, torch.zeros(1, 8), {"num_gist": 1, "student": "gist_mask", "base_model": "x"})
    proc = gist_dist(["export", str(tmp_path), "--peft", str(tmp_path / "adapter")], check=False)
    assert proc.returncode == 1 and "only no-prompt artifacts" in proc.stderr
    assert not (tmp_path / "adapter").exists()


def test_gist_model_folder_is_plain_hf_with_a_model_card(tiny_gist_run):
    card = (tiny_gist_run / "final" / "README.md").read_text()
    assert "<GIST_0>" in card and "Instruction: {instruction}\\n<GIST_0>\\nInput: {input}" in card
    assert "keep only the last 1 entries" in card.lower()


@pytest.mark.parametrize("template, layout", [("chat", "one user turn `{instruction}<GIST_0>\\n{input}`"),
                                              ("chat_system", "the system message `{instruction}<GIST_0>`")])
def test_model_card_follows_the_chat_templates(template, layout):
    from gist_dist.methods.finetune import model_card
    card = model_card(load_config(TINY, [f"data.template={template}"]), ["<GIST_0>"])
    assert f"data.template={template}" in card and layout in card and "Instruction: {instruction}" not in card


def test_column_mapping_for_files_and_a_saved_dataset_folder(tmp_path):
    import datasets
    rows = [{"question": f"Say {i}.", "context": "", "answer": str(i)} for i in range(5)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(TINY, ["data.columns.instruction=question", "data.columns.input=context",
                             "data.columns.output=answer"])
    assert cfg.data.columns == {"instruction": "question", "input": "context", "output": "answer"}
    recs = load_records(str(path), columns=cfg.data.columns)
    assert recs[3] == {"instruction": "Say 3.", "input": "", "output": "3"}
    folder = tmp_path / "qa_ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    assert load_records(str(folder), columns=cfg.data.columns) == recs
    from gist_dist.data import DataError
    with pytest.raises(DataError, match=r"qa.jsonl:1: missing field 'reply' \(mapped to 'output'"):
        load_records(str(path), columns={"instruction": "question", "output": "reply"})
    with pytest.raises(DataError, match="unknown field 'answer'"):
        load_records(str(path), columns={"answer": "answer"})


def test_messages_and_sharegpt_conversations_map_onto_instruction_input_output(tmp_path):
    from gist_dist.data import DataError
    messages = {"messages": [{"role": "system", "content": "Answer in French."},
                             {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Bonjour"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(messages) + "\n" + json.dumps(sharegpt) + "\n")
    assert load_records(str(path)) == [{"instruction": "Answer in French.", "input": "Hello", "output": "Bonjour"},
                                       {"instruction": "Name a colour.", "input": "", "output": "Red"}]
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    path.write_text(json.dumps(messages) + "\n" + json.dumps(multi) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:2: expected \[system,\] user, assistant turns"):
        load_records(str(path))
    stats = DataStats()
    assert len(load_records(str(path), bad_records="skip", stats=stats)) == 1 and stats.skipped_bad == 1


def test_export_refuses_an_artifact_whose_template_puts_text_before_the_gist(tmp_path):
    """compress on a chat model (template chat_system): the header before the gist was hidden from
    later tokens by the gist mask, which causal PEFT / prompt_embeds cannot reproduce."""
    import torch

    from gist_dist import artifact, export
    artifact.save(tmp_path, torch.zeros(2, 64), {"num_gist": 2, "student": "no_prompt", "template": "chat_system",
                                                "base_model": "configs/models/tiny.yaml", "tokenizer": "smollm2"})
    for write in (lambda: export.export_prompt_embeds(tmp_path, tmp_path / "e.safetensors"),
                  lambda: export.export_peft(tmp_path, tmp_path / "peft")):
        with pytest.raises(artifact.ArtifactError, match="before the gist rows"):
            write()
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "peft").exists()
