"""Export: a PEFT prompt-tuning adapter and prompt_embeds from a distill artifact, the fine-tuned model
folder with its model card, and what export refuses."""

from __future__ import annotations

import json

import pytest

from conftest import TINY, gist_dist
from gist_dist.config import load_config


@pytest.fixture(scope="module")
def no_prompt_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("no_prompt")
    gist_dist(
        [
            "train",
            TINY,
            f"output_dir={out}",
            "objective=distill",
            "distill.student=no_prompt",
            "num_gist=2",
            "train.max_steps=3",
            "data.num_train=32",
            "train.lr=0.05",
            "train.verify_frozen=false",
        ]
    )
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
        theirs = model(**tail).logits[0, -len(ids) + 2 :]
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


@pytest.mark.parametrize(
    "template, layout",
    [
        ("chat", "one user turn `{instruction}<GIST_0>\\n{input}`"),
        ("chat_system", "the system message `{instruction}<GIST_0>`"),
    ],
)
def test_model_card_follows_the_chat_templates(template, layout):
    from gist_dist.methods.finetune import model_card

    card = model_card(load_config(TINY, [f"data.template={template}"]), ["<GIST_0>"])
    assert f"data.template={template}" in card and layout in card and "Instruction: {instruction}" not in card


def test_export_refuses_an_artifact_whose_template_puts_text_before_the_gist(tmp_path):
    """compress on a chat model (template chat_system): the header before the gist was hidden from
    later tokens by the gist mask, which causal PEFT / prompt_embeds cannot reproduce."""
    import torch

    from gist_dist import artifact, export

    artifact.save(
        tmp_path,
        torch.zeros(2, 64),
        {
            "num_gist": 2,
            "student": "no_prompt",
            "template": "chat_system",
            "base_model": "configs/models/tiny.yaml",
            "tokenizer": "smollm2",
        },
    )
    for write in (
        lambda: export.export_prompt_embeds(tmp_path, tmp_path / "e.safetensors"),
        lambda: export.export_peft(tmp_path, tmp_path / "peft"),
    ):
        with pytest.raises(artifact.ArtifactError, match="before the gist rows"):
            write()
    assert not (tmp_path / "e.safetensors").exists() and not (tmp_path / "peft").exists()
