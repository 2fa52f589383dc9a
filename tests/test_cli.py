"""The command line: every command lists its fields; configs/*.yaml load; bad input is one line naming the field and
the value, exit code 2, no traceback (a table of cases driven through the CLI's main, two of them through a real
process)."""
import glob
import os
import subprocess
import sys

import pytest

from exgrpo.__main__ import _config_classes, main
from exgrpo.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    from exgrpo.config import EIConfig
    from exgrpo.ei.pipeline import run_ei
    run_ei(EIConfig(limit=4, rules_per_example=2, out_dir=str(d / "ei")), progress=False)
    (d / "empty").mkdir()
    ck = d / "run" / "checkpoints"
    (ck / "step-000001").mkdir(parents=True)
    (ck / "step-000001" / "trainer_state.pt").write_bytes(b"not a torch file")
    (ck / "latest").write_text("step-000001")
    (d / "bad.yaml").write_text("model: [unclosed\n")
    return {"data": str(d / "ei" / "d_ei.jsonl"), "empty": str(d / "empty"), "run": str(d / "run"),
            "bad_yaml": str(d / "bad.yaml")}


BAD = [  # argv (with {placeholders}), the one-line message expected on stderr
    (["sft", "data=/nope/d.jsonl"], r"exgrpo sft: error: data: no such file '/nope/d.jsonl' \(run `exgrpo ei` first\)"),
    (["train", "data={data}", "init=/nope/sft"], r"init: no such folder '/nope/sft' \(run `exgrpo sft` first"),
    (["train", "data={data}", "init={empty}"], r"init: '.*empty' is not a model folder \(no config.json\)"),
    (["eval", "model=/nonexistent"], r"exgrpo eval: error: model: no such folder '/nonexistent'"),
    (["eval", "model={empty}"], r"model: '.*empty' is not a model folder"),
    (["ei", "data=gsm8k,nosuchset"], r"data: unknown data set 'nosuchset'; known: arithmetic, anli"),
    (["eval", "data=nosuchset", "model=/nonexistent"], r"EvalConfig.data: unknown data set .nosuchset."),
    (["sft", "epochs=0"], r"SFTConfig.epochs and batch_dialogues must be >= 1, got 0, 16"),
    (["train", "nu=0.5"], r"TrainConfig.nu must be >= 1, got 0.5"),
    (["train", "G=one"], r"config field 'G': expected int, got 'one'"),
    (["train", "unknown_field=1"], r"unknown config field\(s\) \['unknown_field'\] for TrainConfig"),
    (["train", "sampling.temperature=0.7"], r"sampling.temperature \(0.7\) and loss.temperature \(1.0\) must agree"),
    (["train", "loss.loss_type=ppo"], r"GRPOLossConfig.loss_type must be one of"),
    (["train", "precision=fp8"], r"TrainConfig.precision must be one of \('auto', 'bf16', 'fp32'\), got 'fp8'"),
    (["sft", "--config", "/nope.yaml"], r"--config: no such file '/nope.yaml'"),
    (["sft", "--config", "{bad_yaml}"], r"--config: .*bad.yaml is not valid YAML"),
    (["sft", "--resume", "data={data}", "out_dir={run}", "max_steps=2"],
     r"--resume: checkpoint .*step-000001 is unreadable or from another setup"),
    (["eval", "limit=0"], r"EvalConfig.limit must be >= 1 or null, got 0"),
    (["model.lora_rank=3"], r"exgrpo: error: unknown command 'model.lora_rank=3'"),
]


def _one_line(stderr: str, message: str) -> bool:
    import re
    lines = [x for x in stderr.splitlines() if x.strip() and "Warning" not in x and not x.startswith(" ")]
    return any(re.search(message, x) for x in lines)


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(files, argv, message, capsys):
    """In process (the CLI's main: what `python -m exgrpo` runs), so the table stays cheap; an exception that main
    does not turn into its one line would fail the test with its traceback."""
    argv = [a.format(**files) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and _one_line(err, message), err[-2000:]


@pytest.mark.parametrize("case", [0, 9])
def test_bad_input_through_a_real_process(files, case):
    argv, message = BAD[case]
    r = subprocess.run([sys.executable, "-m", "exgrpo", *[a.format(**files) for a in argv]], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and _one_line(r.stderr, message), r.stderr[-2000:]


def test_debug_shows_the_traceback():
    r = subprocess.run([sys.executable, "-m", "exgrpo", "sft", "--debug", "data=/nope"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.parametrize("name", sorted(_config_classes()))
def test_help_lists_every_field_with_its_default(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    import dataclasses
    cls = _config_classes()[name]
    for f in dataclasses.fields(cls):
        assert f"  {f.name}" in out, f.name
    assert "(default " in out


def test_flags_only_on_their_commands(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--resume"])
    assert "unrecognized arguments: --resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--seeds", "3"])


def test_print_config_resolves_overrides(capsys):
    assert main(["train", "--print-config", "model.lora_rank=8", "loss.beta=0.0"]) == 0
    out = capsys.readouterr().out
    assert "lora_rank: 8" in out and "beta: 0.0" in out


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_example_configs_load(path):
    name = os.path.basename(path).split("_")[0].split(".")[0]
    classes = _config_classes()
    assert name in classes, f"configs/{os.path.basename(path)} must start with a command name"
    load_config(classes[name], path)


def test_there_is_an_example_config_per_command():
    have = {os.path.basename(p).split("_")[0].split(".")[0] for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    assert set(_config_classes()) <= have
