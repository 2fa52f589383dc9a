"""Data parallel training: 2 gloo ranks (torchrun) give the same losses and weights as 1 rank on the same global
batch, for SFT steps and for a GRPO update (loss normalised by the global token count)."""
import os
import subprocess
import sys

import torch

from exgrpo.ei.pipeline import EIConfig, run_ei
from exgrpo.model import ModelConfig, build_student

HERE = os.path.dirname(__file__)


def run(nproc, data, out):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(HERE, "ddp_script.py"), data, out] if nproc > 1 else [
        sys.executable, os.path.join(HERE, "ddp_script.py"), data, out]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(os.path.join(out, "result.pt"), weights_only=False)


def test_two_gloo_ranks_equal_one_rank(tmp_path):
    run_ei(EIConfig(limit=12, rules_per_example=2, out_dir=str(tmp_path / "ei")), progress=False)
    data = str(tmp_path / "ei" / "d_ei.jsonl")
    one = run(1, data, str(tmp_path / "one"))
    two = run(2, data, str(tmp_path / "two"))
    assert len(one["sft_losses"]) == 3
    for a, b in zip(one["sft_losses"], two["sft_losses"]):
        assert abs(a - b) < 1e-5 * max(1, abs(a))
    m1, _ = build_student(ModelConfig(path=one["sft_final"]))
    m2, _ = build_student(ModelConfig(path=two["sft_final"]))
    for (n, p), q in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=2e-5), n
    assert abs(one["grpo_loss"] - two["grpo_loss"]) < 1e-5
    for k, v in one["grpo_weights"].items():
        assert torch.allclose(v, two["grpo_weights"][k], atol=2e-5), k
