"""Bad configs: one clear line on stderr, exit code 2, and no output directory created."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY, free_port, gist_dist
from gist_dist.cli import main
from gist_dist.config import ConfigError, RunConfig, load_config


def dotted_keys(obj=None, prefix="") -> list[str]:
    obj, keys = RunConfig() if obj is None else obj, []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        keys += dotted_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return keys


BAD_OVERRIDES = [
    (["nope=1"], "unknown config key 'nope'"),
    (["train.nope=1"], "unknown config key 'train.nope'"),
    (["train.max_steps=ten"], "train.max_steps: expected int, got 'ten'"),
    (["train.lr=fast"], "train.lr: expected float"),
    (["model=3"], "model: expected a mapping"),
    (["num_gist=0"], "num_gist must be between 1 and 64, got 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size must be >= 1"),
    (["train.grad_accum=0"], "train.grad_accum must be >= 1"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints must be >= 1"),
    (["train.save_every=-1"], "train.save_every must be >= 0"),
    (["timeout_s=0"], "timeout_s must be > 0"),
    (["mask=gisty"], "mask must be one of gist, pos_control, neg_control, got 'gisty'"),
    (["mode=pos_control"], "mode=pos_control was removed: write objective=finetune mask=pos_control instead"),
    (["mode=distill"], "mode=distill was removed: write objective=distill instead"),
    (["log.backends=[jsonl,nope]"], "log.backends must be one of jsonl, tensorboard, wandb, got 'nope'"),
    (["log.backends=[jsonl"], "log.backends: not valid YAML flow syntax"),
    (["mask_prefix=shown"], "mask_prefix must be one of hidden, visible, got 'shown'"),
    (["data.overlong=clip"], "data.overlong must be one of truncate, drop, got 'clip'"),
    (["zero.stage=2", "zero.offload_param=cpu"], "zero.offload_param needs zero.stage=3"),
    (["zero.stage=5"], "zero.stage must be one of 0, 1, 2, 3, got '5'"),
    (["max_steps"], "override 'max_steps' is not key=value"),
    (
        ["objective=distill", "distill.params=offsets", "train.activation_checkpointing=true"],
        "distill.params=offsets cannot be combined with train.activation_checkpointing",
    ),
    (["distill.layer_offsets=true"], "distill.layer_offsets was removed: write distill.params=offsets instead"),
]


@pytest.mark.parametrize("overrides, message", BAD_OVERRIDES)
def test_bad_override_exits_2_with_one_line(overrides, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", TINY, f"output_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gist-dist: config error: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  max_steps: 5\n  warmup: 2\n", "unknown config key 'train.warmup'"),
        ("train: [1, 2]\n", "train: expected a mapping"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("train: {max_steps: 5\n", "not valid YAML"),
        ("num_gist: true\n", "num_gist: expected int, got True"),
    ],
)
def test_bad_yaml_file(text, message, tmp_path, capsys):
    cfg, out = tmp_path / "bad.yaml", tmp_path / "run"
    cfg.write_text(text)
    assert main(["train", str(cfg), f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_an_old_config_with_mode_gets_one_line_saying_what_to_write(tmp_path):
    cfg = tmp_path / "old.yaml"
    cfg.write_text("mode: neg_control\n")
    with pytest.raises(
        ConfigError, match="^mode=neg_control was removed: write objective=finetune mask=neg_control instead$"
    ):
        load_config(str(cfg))


def test_overrides_in_yaml_flow_syntax_read_as_yaml():
    cfg = load_config(
        TINY, ["log.backends=[jsonl, tensorboard]", "data.columns={instruction: question}", "zero.stage=2"]
    )
    assert cfg.log.backends == ["jsonl", "tensorboard"] and cfg.data.columns == {"instruction": "question"}
    assert cfg.zero.stage == 2 and load_config(TINY, ["log.backends=jsonl,wandb"]).log.backends == ["jsonl", "wandb"]


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from(dotted_keys()) | st.text(max_size=8), st.text(max_size=8) | st.integers(-3, 100).map(str)
        ),
        max_size=4,
    )
)
def test_fuzzed_overrides_give_a_config_or_a_config_error(items):
    try:
        cfg = load_config(TINY, [f"{k}={v}" for k, v in items])
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert cfg.num_gist >= 1 and cfg.train.micro_batch_size >= 1 and cfg.train.max_steps >= 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["zero.stage=2"], "zero.stage=2 but configs/zero3.json says stage 3"),
        (["zero.json=/nonexistent/ds.json"], "DeepSpeed config not found"),
        (["num_gist=0"], "num_gist must be between 1 and 64"),
        (["objective=distill", "distill.params=kv"], "distill.params=kv trains one fixed cache"),
    ],
)
def test_cli_process_exit_code_2_and_nothing_written(overrides, message, tmp_path):
    """The real console script, including settings only checked against the DeepSpeed JSON."""
    out = tmp_path / "run"
    proc = gist_dist(
        ["train", TINY, f"output_dir={out}", *overrides], check=False, env={"MASTER_PORT": str(free_port())}
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if "gist-dist" in line]
    assert len(ours) == 1 and ours[0].startswith("gist-dist: config error:") and message in ours[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
