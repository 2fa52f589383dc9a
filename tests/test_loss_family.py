"""The GRPO loss family beyond the clip objective, and the options TRL 1.16 adds, against the float64 reference
(``grpo_loss_reference``, autograd on full logits) on every backend (triton under the interpreter, native, torch),
both memory modes: loss, metrics, grad-hidden, grad-weight. The Liger / TRL parity of the same formulas is in
test_integrations.py."""
import pytest
import torch
from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss
from exgrpo_kernels.grpo_loss.losses import policy_terms

from tests.test_grpo_loss import BASE, check, make_batch
from tests.utils import BACKENDS, DEVICE

CASES = {  # name: (config overrides, input overrides)
    "cispo": (dict(loss_type="cispo", eps_high=1.3), {}),
    "cispo_no_old_k2": (dict(loss_type="cispo", eps_high=1.3, kl_estimator="k2"), dict(old_logp=None)),
    "sapo": (dict(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.7), {}),
    "sapo_is_tok": (dict(loss_type="sapo"), dict(is_weights="tok")),
    "luspo_seq": (dict(loss_type="luspo", importance_sampling="sequence"), {}),
    "luspo_token": (dict(loss_type="luspo"), dict(is_weights="seq")),
    "vespo": (dict(loss_type="vespo", vespo_k_pos=1.5, vespo_lambda_neg=2.5), {}),
    "vespo_is_seq": (dict(loss_type="vespo"), dict(is_weights="seq")),
    "vespo_token_mask": (dict(loss_type="vespo", gen_correction="token_mask", gen_correction_cap=1.2),
                         dict(is_weights="tok")),
    "bias_kl_token": (dict(use_bias_correction_kl=True), {}),
    "bias_kl_sequence": (dict(use_bias_correction_kl=True, importance_sampling="sequence"), {}),
    "bias_kl_no_old": (dict(use_bias_correction_kl=True, loss_type="grpo"), dict(old_logp=None)),
    "token_mask": (dict(gen_correction="token_mask", gen_correction_cap=1.15, gen_correction_min=0.9), {}),
    "token_mask_no_old": (dict(gen_correction="token_mask", gen_correction_cap=1.15), dict(old_logp=None)),
    "token_truncate_min_no_old": (dict(gen_correction="token_truncate", gen_correction_min=0.95),
                                  dict(old_logp=None)),
    "sequence_mask": (dict(gen_correction="sequence_mask", gen_correction_cap=1.5, gen_correction_min=0.5), {}),
    "sequence_mask_no_old": (dict(gen_correction="sequence_mask", gen_correction_cap=1.5), dict(old_logp=None)),
    "off_policy": (dict(off_policy_mask_threshold=-0.05, loss_type="bnpo"), {}),
    "off_policy_no_gen": (dict(off_policy_mask_threshold=0.0, loss_type="cispo", eps_high=2.0), dict(gen_logp=None)),
    "entropy_bonus": (dict(entropy_coef=0.05), {}),
    "entropy_bonus_sequence": (dict(entropy_coef=0.05, importance_sampling="sequence", loss_type="grpo"), {}),
    "entropy_mask": (dict(top_entropy_quantile=0.4), {}),
    "entropy_mask_bonus_vespo": (dict(top_entropy_quantile=0.5, entropy_coef=0.02, loss_type="vespo"), {}),
}


def _inputs(b, over):
    over = dict(over)
    S = b["advantages"].shape[0]
    g = torch.Generator().manual_seed(7)
    if over.get("is_weights") == "tok":
        over["is_weights"] = (torch.rand(b["targets"].shape[0], generator=g) + 0.5).to(DEVICE)
    elif over.get("is_weights") == "seq":
        over["is_weights"] = (torch.rand(S, generator=g) + 0.5).to(DEVICE)
    return over


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("memory_mode", ["fast", "low_memory"])
@pytest.mark.parametrize("case", list(CASES))
def test_variants_against_float64(backend, memory_mode, case):
    cfg_over, in_over = CASES[case]
    b = make_batch(seed=list(CASES).index(case) + 300)
    cfg = BASE.replace(backend=backend, memory_mode=memory_mode, **cfg_over)
    check(b, cfg, **_inputs(b, in_over))


def test_the_variants_differ():
    """Each option changes the loss or its gradient on this batch (a variant silently ignored would fail)."""
    b = make_batch(seed=5)
    base = [x.detach() for x in check(b, BASE.replace(backend="torch")) if isinstance(x, torch.Tensor)]
    for case, (cfg_over, in_over) in CASES.items():
        got = [x.detach() for x in check(b, BASE.replace(backend="torch", **cfg_over), **_inputs(b, in_over))
               if isinstance(x, torch.Tensor)]
        diff = max(abs(float(got[0] - base[0])), float((got[1] - base[1]).abs().max()))
        assert diff > 1e-4, case


def test_off_policy_mask_drops_only_negative_advantage_drifted_sequences():
    b = make_batch(seed=9, empty_seq=False)
    n, S = b["targets"].shape[0], b["advantages"].shape[0]
    l = torch.zeros(n)
    gen = torch.zeros(n)
    drifted = b["seq_ids"].cpu() == 1
    gen[drifted] = 0.5  # mean (l_gen - l) = 0.5 on sequence 1
    for a1, kept in ((-1.0, False), (1.0, True)):
        adv = torch.ones(S)
        adv[1] = a1
        cfg = GRPOLossConfig(beta=0.0, off_policy_mask_threshold=0.1)
        terms, c, _ = policy_terms(l, old=None, ref=None, gen=gen, ext=None, ext_seq=None, adv_seq=adv,
                                w_seq=torch.ones(S), seq_ids=b["seq_ids"].cpu(), cfg=cfg)
        assert bool((c[drifted] != 0).all()) == kept
        assert bool((c[~drifted] != 0).all())


@pytest.mark.parametrize("bad,match", [
    (dict(loss_type="sapo", importance_sampling="sequence"), "importance_sampling='sequence' is not defined"),
    (dict(loss_type="vespo", gen_correction="sequence_truncate"), "vespo"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg must be > 0"),
    (dict(gen_correction="token_mask", gen_correction_min=3.0), "gen_correction_min"),
    (dict(gen_correction="token_clip"), "gen_correction must be one of"),
    (dict(loss_type="ppo"), "loss_type must be one of"),
])
def test_config_errors_name_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        GRPOLossConfig(**bad)


def test_every_variant_needs_the_inputs_it_names():
    b = make_batch(seed=1)
    with pytest.raises(ValueError, match="gen_logp is None but config.gen_correction = 'token_mask'"):
        fused_linear_grpo_loss(b["hidden"], b["weight"], b["targets"], b["seq_ids"], b["advantages"],
                               b["loss_mask"], GRPOLossConfig(beta=0.0, gen_correction="token_mask"))
