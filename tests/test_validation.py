"""Bad input to the public kernels: a ValueError that names the argument and the value."""
import pytest
import torch
from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss, fused_linear_logprobs


def _args(N=8, H=4, V=10, S=3):
    return dict(hidden=torch.randn(N, H), weight=torch.randn(V, H), targets=torch.randint(0, V, (N,)),
                seq_ids=torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])[:N], advantages=torch.randn(S),
                loss_mask=torch.ones(N, dtype=torch.bool))


CFG = GRPOLossConfig(beta=0.0, backend="torch")


@pytest.mark.parametrize("change,match", [
    (dict(hidden=torch.randn(8, 5)), r"H differs"),
    (dict(hidden=torch.randn(8)), r"hidden must be 2-D"),
    (dict(hidden=torch.randn(0, 4)), r"hidden has no rows"),
    (dict(hidden=torch.randn(8, 4).double()), r"dtype torch.float64 differs from weight dtype"),
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, 5, 6, 10])), r"targets\[7\] = 10 is outside \[0, V=10\)"),
    (dict(targets=torch.tensor([0, 1, -5, 3, 4, 5, 6, 7])), r"targets\[2\] = -5"),
    (dict(targets=torch.zeros(8)), r"targets must have dtype"),
    (dict(targets=torch.zeros(7, dtype=torch.long)), r"targets must have shape \(8,\)"),
    (dict(seq_ids=torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])), r"seq_ids\[7\] = 3 is outside \[0, S=3\)"),
    (dict(seq_ids=torch.zeros(8)), r"seq_ids must have dtype"),
    (dict(advantages=torch.randn(3, 1)), r"advantages must be a non-empty 1-D"),
    (dict(advantages=torch.randn(0)), r"advantages must be a non-empty 1-D"),
    (dict(loss_mask=torch.full((8,), 0.5)), r"loss_mask must hold only 0 and 1"),
    (dict(loss_mask=torch.ones(9, dtype=torch.bool)), r"loss_mask must have shape \(8,\)"),
    (dict(old_logp=torch.randn(7)), r"old_logp must have shape \(8,\)"),
    (dict(ref_logp=torch.randn(8, dtype=torch.float64).long()), r"ref_logp must have dtype"),
    (dict(num_global_tokens=0), r"num_global_tokens must be > 0"),
])
def test_grpo_loss_bad_input(change, match):
    a = _args()
    kw = {k: change.pop(k) for k in ("old_logp", "ref_logp", "gen_logp", "num_global_tokens") if k in change}
    a.update(change)
    with pytest.raises(ValueError, match=match):
        fused_linear_grpo_loss(*a.values(), CFG, **kw)


def test_grpo_loss_config_errors():
    with pytest.raises(ValueError, match=r"GRPOLossConfig.loss_type must be one of .* got 'ppo'"):
        GRPOLossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match=r"max_completion_length must be a positive int for loss_type='dr_grpo'"):
        GRPOLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match=r"GRPOLossConfig.kl_estimator"):
        GRPOLossConfig(kl_estimator="k4")
    with pytest.raises(ValueError, match=r"GRPOLossConfig.delta must be > 0 or None, got -0.5"):
        GRPOLossConfig(delta=-0.5)
    with pytest.raises(ValueError, match=r"GRPOLossConfig.temperature must be > 0"):
        GRPOLossConfig(temperature=0)
    a = _args()
    with pytest.raises(ValueError, match=r"ref_logp is None but config.beta = 0.04"):
        fused_linear_grpo_loss(*a.values(), GRPOLossConfig(backend="torch"))
    with pytest.raises(ValueError, match=r"gen_logp is None but config.gen_correction = 'token_truncate'"):
        fused_linear_grpo_loss(*a.values(), CFG.replace(gen_correction="token_truncate"))
    with pytest.raises(ValueError, match=r"config must be a GRPOLossConfig"):
        fused_linear_grpo_loss(*a.values(), {"beta": 0})


def test_logprobs_bad_input():
    h, w = torch.randn(4, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match=r"targets\[0\] = 6 is outside \[0, V=6\)"):
        fused_linear_logprobs(h, w, torch.tensor([6, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"temperature must be > 0, got -1"):
        fused_linear_logprobs(h, w, torch.zeros(4, dtype=torch.long), temperature=-1)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fused_linear_logprobs(h, w, torch.zeros(4, dtype=torch.long), backend="cuda")
