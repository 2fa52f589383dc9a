"""Drop-ins for other GRPO trainers, against the peers themselves on the same inputs (CPU):

- Liger-Kernel 0.8.5: ``FusedLinearGRPOLoss`` vs ``LigerFusedLinearGRPOLoss``: loss, grad-input, grad-weight,
  grad-bias and metrics for every loss type x importance level both have, with and without KL, old log-probs,
  vLLM IS ratios and delta; a perturbed config makes the comparison fail (the test can see a difference).
- TRL 1.16: the fused LM head (log-probs, entropies, gradients) vs TRL's own ``add_fused_lm_head``, also with
  Gemma-2 soft-capping; two GRPOTrainer steps of a tiny local model: the same parameters with TRL's head and ours.
- verl 0.9.1: ``FusedLinearForPPO`` vs verl's own (its source read from the verl wheel, padded and packed inputs).
- OpenRLHF: not installable here (flash-attn, a CUDA build); ``FusedActor`` against OpenRLHF's formulas written
  out in torch (fp32 logits / temperature, log-probs of the rolled sequence, action-mask slice).
Skipped only when the peer is absent; `make test` installs Liger, TRL and the verl wheel."""
import glob
import importlib.util
import os
import zipfile

import pytest
import torch
from exgrpo_kernels.integrations import FusedLinearGRPOLoss

from tests.utils import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(B=4, T=9, H=16, V=83, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.4
    b = torch.randn(V, generator=g) * 0.3 if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[2] = 0  # a sequence with no completion token
    adv = torch.randn(B, generator=g)
    adv[0], adv[1] = -adv[0].abs(), adv[1].abs()  # both signs (sapo and vespo choose their parameters by sign)
    with torch.no_grad():
        lp = torch.log_softmax((x @ w.t() + (0 if b is None else b)) / 0.9, -1).gather(-1, ids[..., None])[..., 0]
    old = lp + 0.25 * torch.randn(B, T, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, generator=g)
    is_tok = (torch.rand(B, T, generator=g) + 0.5).masked_fill(mask == 0, 1.0)  # TRL: ratio 1 where padded
    is_seq = torch.rand(B, 1, generator=g) + 0.5
    return dict(x=x, w=w, b=b, ids=ids, mask=mask, adv=adv, old=old, ref=ref, is_tok=is_tok, is_seq=is_seq)


def _run(module, p, **kw):
    x = p["x"].clone().requires_grad_()
    w = p["w"].clone().requires_grad_()
    b = None if p["b"] is None else p["b"].clone().requires_grad_()
    loss, metrics = module(x, w, p["ids"], p["mask"], p["adv"], bias=b, **kw)
    (loss * 1.5).backward()
    return [loss, x.grad, w.grad] + ([b.grad] if b is not None else []), metrics


LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
TOKEN_ONLY = ("cispo", "sapo", "vespo")  # sequence-level ratios are not defined for them (Liger and TRL raise)
CASES = [(lt, lvl, beta) for lt in LOSS_TYPES for lvl in ("token", "sequence") for beta in (0.0, 0.04)
         if not (lvl == "sequence" and lt in TOKEN_ONLY)]


def _liger_luspo_is_per_token(level, beta, extras):
    """Liger 0.8.5's luspo multiplies the *unmasked* [B, T] per-token loss by each sequence's token count when the
    loss is per token (token level, a KL term or per-token IS ratios): padded positions then enter its loss. TRL
    1.16 masks them (``(per_token_loss * mask).sum(-1).mean()``), as we do; the two agree where nothing is
    padded, which is how the Liger comparison is run in those cases (the TRL comparison below keeps the padding)."""
    return level == "token" or beta != 0 or "is_token" in extras


@pytest.mark.parametrize("loss_type,level,beta", CASES)
@pytest.mark.parametrize("extras", ["old", "old+is_token", "old+is_seq+delta", "none", "old+bias_kl"])
def test_liger_parity(loss_type, level, beta, extras):
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    p = _problem(seed=CASES.index((loss_type, level, beta)))
    if loss_type == "luspo" and _liger_luspo_is_per_token(level, beta, extras):
        p["mask"] = torch.ones_like(p["mask"])
    ctor = dict(beta=beta, epsilon_low=0.2, epsilon_high=1.3 if loss_type == "cispo" else 0.28, loss_type=loss_type,
                max_completion_length=12, importance_sampling_level=level, temperature=0.9, use_ref_model=beta != 0,
                delta=1.5 if "delta" in extras else None, use_bias_correction_kl="bias_kl" in extras,
                sapo_temperature_neg=1.6, vespo_k_pos=1.5, vespo_lambda_neg=2.5)
    kw = {}
    if beta:
        kw["ref_per_token_logps"] = p["ref"]
    if "old" in extras:
        kw["old_per_token_logps"] = p["old"]
    if "is_token" in extras:
        kw["vllm_is_ratio"] = p["is_tok"]
    if "is_seq" in extras:
        kw["vllm_is_ratio"] = p["is_seq"]
    theirs, tm = _run(liger.LigerFusedLinearGRPOLoss(compiled=False, chunk_size=2, **ctor), p, **kw)
    ours, om = _run(FusedLinearGRPOLoss(**ctor), p, **kw)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert rel_err(a, b) < 2e-5, f"output {i}: {rel_err(a, b):.2e}"
    assert len(om) == len(tm)
    for a, b in zip(om, tm):
        assert float(a) == pytest.approx(float(b), rel=1e-5, abs=1e-7)


def test_liger_parity_sees_a_perturbed_config():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    p = _problem(seed=3)
    kw = dict(old_per_token_logps=p["old"], ref_per_token_logps=p["ref"])
    theirs, _ = _run(liger.LigerFusedLinearGRPOLoss(compiled=False, epsilon_high=0.28, temperature=0.9), p, **kw)
    ours, _ = _run(FusedLinearGRPOLoss(epsilon_high=0.2, temperature=0.9), p, **kw)  # eps_high differs
    assert max(rel_err(a, b) for a, b in zip(ours, theirs)) > 1e-3


def test_liger_constructor_and_forward_checks_follow_liger():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    for bad in (dict(sapo_temperature_pos=0.0), dict(sapo_temperature_neg=-1.0), dict(delta=0.0)):
        with pytest.raises(ValueError) as theirs:
            liger.LigerFusedLinearGRPOLoss(**bad)
        with pytest.raises(ValueError) as ours:
            FusedLinearGRPOLoss(**bad)
        assert str(ours.value) == str(theirs.value)
    p = _problem(seed=2)
    for lt in TOKEN_ONLY:
        with pytest.raises(ValueError, match="Sequence-level importance sampling is not supported"):
            _run(FusedLinearGRPOLoss(loss_type=lt, importance_sampling_level="sequence", beta=0.0), p)
    with pytest.warns(UserWarning, match="Both ref_per_token_logps and ref_input are provided"):
        _run(FusedLinearGRPOLoss(), p, ref_per_token_logps=p["ref"], ref_input=p["x"], ref_weight=p["w"])


# ----------------------------------------------------------------------------------------------------- TRL


TRL_EXTRAS = ["old", "old+is_token+bias_kl", "old+is_seq+delta", "none+off_policy", "old+off_policy+is_token",
              "old+ent_mask", "old+ent_bonus"]


def _trl_loss(p, loss_type, level, beta, extras, trl_grpo):
    """TRL 1.16's own ``GRPOTrainer._compute_loss`` on a stub trainer whose per-token log-probs come from the full
    logits of the same hidden states (so its loss is differentiable in them). Returns ([loss, grad_x, grad_w,
    grad_b], metrics)."""
    import collections
    import types
    x, w, b = (p[k].clone().requires_grad_() for k in ("x", "w", "b"))

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        logits = (x @ w.t() + b) / 0.9
        lp = torch.log_softmax(logits, -1)
        return lp.gather(-1, p["ids"][..., None])[..., 0], -(lp.exp() * lp).sum(-1), None

    args = types.SimpleNamespace(use_bias_correction_kl="bias_kl" in extras, delta=1.5 if "delta" in extras else None,
                                 sapo_temperature_pos=1.0, sapo_temperature_neg=1.6, vespo_k_pos=1.5,
                                 vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.5, steps_per_generation=1)
    acc = types.SimpleNamespace(num_processes=1, sync_gradients=True, gather=lambda t: t,
                                gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t,
                                pad_across_processes=lambda t, dim=0, pad_index=0: t)
    is_ratio = p["is_tok"] if "is_token" in extras else (p["is_seq"] if "is_seq" in extras else None)
    stub = types.SimpleNamespace(
        args=args, accelerator=acc, loss_type=loss_type, importance_sampling_level=level, beta=beta,
        epsilon_low=0.2, epsilon_high=1.3 if loss_type == "cispo" else 0.28, max_completion_length=12,
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=True,
        off_policy_mask_threshold=0.05 if "off_policy" in extras else None,
        top_entropy_quantile=0.4 if "ent_mask" in extras else 1.0, _entropy_bonus_enabled="ent_bonus" in extras,
        entropy_coef=0.05, use_adaptive_entropy=False, aux_loss_enabled=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _get_per_token_logps_and_entropies=logps_and_entropies, get_off_policy_mask=trl_grpo.get_off_policy_mask,
        get_gamma_weights=trl_grpo.get_gamma_weights)
    stub.get_high_entropy_mask = lambda *a: trl_grpo.get_high_entropy_mask(stub, *a)
    B, T = p["ids"].shape
    inputs = dict(prompt_ids=p["ids"][:, :0], prompt_mask=p["mask"][:, :0], completion_ids=p["ids"],
                  completion_mask=p["mask"], advantages=p["adv"], num_items_in_batch=p["mask"].sum(),
                  sampling_per_token_logps=p["gen"])
    if "old" in extras:
        inputs["old_per_token_logps"] = p["old"]
    if beta:
        inputs["ref_per_token_logps"] = p["ref"]
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = trl_grpo._compute_loss(stub, None, inputs)
    (loss * 1.5).backward()
    return [loss, x.grad, w.grad, b.grad], stub._metrics["train"]


# the entropy bonus takes the policy term's aggregation weight, TRL's is a token mean: they agree where the
# aggregation is a token mean (dapo, bnpo, cispo, vespo), where the comparison is made
TRL_CASES = [(lt, lvl, beta, ex) for lt, lvl, beta in CASES for ex in TRL_EXTRAS
             if not ("ent_bonus" in ex and lt not in ("dapo", "bnpo", "cispo", "vespo"))]


@pytest.mark.parametrize("loss_type,level,beta,extras", TRL_CASES)
def test_trl_loss_parity(loss_type, level, beta, extras):
    """fused_linear_grpo_loss with TRL's option names against TRL's ``_compute_loss`` (every loss type, token and
    sequence level, KL, old log-probs, vLLM IS ratios per token and per sequence, delta, the bias-corrected KL,
    the off-policy sequence mask with the sampling log-probs); padded positions stay padded (luspo too)."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer
    from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss
    p = _problem(seed=CASES.index((loss_type, level, beta)) + 50)
    p["gen"] = p["old"] + 0.1 * torch.randn(p["old"].shape, generator=torch.Generator().manual_seed(1))
    theirs, tm = _trl_loss(p, loss_type, level, beta, extras, GRPOTrainer)
    cfg = GRPOLossConfig(loss_type=loss_type, importance_sampling=level, eps_low=0.2,
                         eps_high=1.3 if loss_type == "cispo" else 0.28, delta=1.5 if "delta" in extras else None,
                         beta=beta, use_bias_correction_kl="bias_kl" in extras, sapo_temperature_neg=1.6,
                         vespo_k_pos=1.5, vespo_lambda_neg=2.5, temperature=0.9, max_completion_length=12,
                         off_policy_mask_threshold=0.05 if "off_policy" in extras else None,
                         top_entropy_quantile=0.4 if "ent_mask" in extras else 1.0,
                         entropy_coef=0.05 if "ent_bonus" in extras else 0.0)
    B, T, H = p["x"].shape
    x, w, b = (p[k].clone().requires_grad_() for k in ("x", "w", "b"))
    flat = lambda t: t.reshape(-1)  # noqa: E731
    isw = p["is_tok"].reshape(-1) if "is_token" in extras else (p["is_seq"].reshape(-1) if "is_seq" in extras else None)
    loss, m = fused_linear_grpo_loss(x.reshape(B * T, H), w, flat(p["ids"]), torch.arange(B).repeat_interleave(T),
                                     p["adv"], flat(p["mask"]), cfg, bias=b,
                                     old_logp=flat(p["old"]) if "old" in extras else None,
                                     ref_logp=flat(p["ref"]) if beta else None, gen_logp=flat(p["gen"]),
                                     is_weights=isw, num_global_tokens=float(p["mask"].sum()))
    (loss * 1.5).backward()
    for i, (a, t) in enumerate(zip([loss, x.grad, w.grad, b.grad], theirs)):  # fp32 both; a loss near 0: 1e-7 abs
        assert rel_err(a, t) < 2e-5 or float((a - t).abs().max()) < 1e-7, f"output {i}: {rel_err(a, t):.2e}"
    if beta:
        assert float(m["kl"]) == pytest.approx(tm["kl"][0], rel=1e-5, abs=1e-7)
    if cfg.objective == "clip" and level == "token":
        assert float(m["clip_frac_high"]) == pytest.approx(tm["clip_ratio/high_mean"][0], abs=1e-7)
    if loss_type == "cispo":
        assert float(m["clip_frac_high"]) == pytest.approx(tm["cispo_clip_ratio"][0], abs=1e-7)


@pytest.mark.parametrize("loss_type,perturb", [("cispo", dict(eps_high=1.2)), ("sapo", dict(sapo_temperature_neg=1.0)),
                                               ("vespo", dict(vespo_k_pos=1.6)), ("luspo", dict(loss_type="dapo")),
                                               ("dapo", dict(use_bias_correction_kl=False))])
def test_trl_parity_sees_a_perturbed_config(loss_type, perturb):
    pytest.importorskip("trl")
    from trl import GRPOTrainer
    from exgrpo_kernels import GRPOLossConfig, fused_linear_grpo_loss
    p = _problem(seed=7)
    p["gen"], p["adv"] = p["old"], torch.tensor([0.7, -1.1, 0.3, -0.4])  # both signs (sapo, vespo pick by sign)
    extras = "old+bias_kl"
    theirs, _ = _trl_loss(p, loss_type, "token", 0.04, extras, GRPOTrainer)
    cfg = GRPOLossConfig(loss_type=loss_type, eps_high=1.3 if loss_type == "cispo" else 0.28, beta=0.04,
                         use_bias_correction_kl=True, sapo_temperature_neg=1.6, vespo_k_pos=1.5, vespo_lambda_neg=2.5,
                         temperature=0.9).replace(**perturb)
    B, T, H = p["x"].shape
    x, w, b = (p[k].clone().requires_grad_() for k in ("x", "w", "b"))
    loss, _ = fused_linear_grpo_loss(x.reshape(B * T, H), w, p["ids"].reshape(-1), torch.arange(B).repeat_interleave(T),
                                     p["adv"], p["mask"].reshape(-1), cfg, bias=b, old_logp=p["old"].reshape(-1),
                                     ref_logp=p["ref"].reshape(-1), num_global_tokens=float(p["mask"].sum()))
    (loss * 1.5).backward()
    assert max(rel_err(a, t) for a, t in zip([loss, x.grad, w.grad, b.grad], theirs)) > 1e-3



def _tiny_causal_lm(arch="llama", seed=0):
    import transformers
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(seed)
    if arch == "gemma2":
        cfg = transformers.Gemma2Config(**common, final_logit_softcapping=3.0, attn_logit_softcapping=None)
    else:
        cfg = transformers.LlamaConfig(**common)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        m.get_output_embeddings().weight.mul_(20.0)
    return m


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_trl_fused_head_parity(arch):
    pytest.importorskip("trl")
    from exgrpo_kernels.integrations.trl import add_fused_lm_head as our_head
    from trl.trainer.utils import add_fused_lm_head as trl_head
    ids = torch.randint(0, 97, (3, 14), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 10:] = -100
    out = {}
    for name, patch in (("trl", trl_head), ("ours", our_head)):
        m = _tiny_causal_lm(arch)
        patch(m, temperature=0.7, outputs=("log_probs", "entropy"))
        o = m(input_ids=ids, labels=labels, fused_lm_head=True)
        (o.log_probs.sum() + 0.3 * o.entropy.sum()).backward()
        out[name] = [o.log_probs, o.entropy, o.loss] + [p.grad for p in m.parameters()]
    for i, (a, b) in enumerate(zip(out["ours"], out["trl"])):
        assert rel_err(a, b) < 1e-5, f"output {i}: {rel_err(a, b):.2e}"


def test_trl_grpo_trainer_two_steps_match(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from exgrpo_kernels.integrations.trl import GRPOTrainer

    from exgrpo.tokenizer import byte_tokenizer

    tok = byte_tokenizer("chatml")
    data = datasets.Dataset.from_list([{"prompt": f"{a}+{b}="} for a in range(4) for b in range(2)])

    def reward(completions, **kw):
        return [float(len(c)) / 10.0 - c.count("1") for c in completions]

    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                   bos_token_id=tok.bos_token_id)
    init_dir = tmp_path / "init"  # TRL builds the reference model from the policy's path
    transformers.LlamaForCausalLM(cfg).save_pretrained(init_dir)
    tok.save_pretrained(init_dir)

    def train(cls, out):
        model = transformers.AutoModelForCausalLM.from_pretrained(init_dir)
        init = {n: q.detach().clone() for n, q in model.named_parameters()}
        args = trl.GRPOConfig(output_dir=str(out), per_device_train_batch_size=4, num_generations=4,
                              max_completion_length=6, max_steps=2, learning_rate=5e-2, logging_steps=1, seed=0,
                              report_to=[], save_strategy="no", use_cpu=True, beta=0.04, temperature=0.9,
                              dataloader_num_workers=0, bf16=False)
        trainer = cls(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
        head_file = trainer.model.forward.__func__.__code__.co_filename
        assert head_file.endswith(os.path.join("integrations", "trl.py")) == (cls is GRPOTrainer), head_file
        trainer.train()
        final = {n: q.detach().clone() for n, q in model.named_parameters()}
        assert any(not torch.equal(init[n], final[n]) for n in init), "the two steps did not move the model"
        return final, trainer.state.log_history

    stock, log_stock = train(trl.GRPOTrainer, tmp_path / "stock")
    ours, log_ours = train(GRPOTrainer, tmp_path / "ours")
    # AdamW divides each element's gradient by its own running scale, so an element whose gradient is float noise
    # (a head row of a token never sampled) moves by up to lr either way: float-order differences between TRL's
    # full-logits path and ours reach 3.5e-5 on one of 8288 head elements (native backend); a wrong gradient moves
    # elements by O(lr) = 5e-2.
    for n in stock:
        assert torch.allclose(stock[n], ours[n], rtol=1e-4, atol=2e-4), n
    losses = [(a.get("loss"), b.get("loss")) for a, b in zip(log_stock, log_ours) if "loss" in a]
    assert losses and all(a == pytest.approx(b, rel=1e-4, abs=1e-6) for a, b in losses)


# ----------------------------------------------------------------------------------------------------- verl


def _verl_reference():
    """verl's FusedLinearForPPO, read from the verl wheel (verl's own dependencies cannot be installed beside
    this project's: its package import pulls ray and pins another transformers)."""
    wheels = sorted(glob.glob(os.path.join(os.environ.get("EXGRPO_PEERS", os.path.join(ROOT, ".venv", "peers")),
                                           "verl-*.whl")))
    if not wheels:
        pytest.skip("verl wheel not present (make test downloads it to .venv/peers)")
    with zipfile.ZipFile(wheels[-1]) as z:
        src = z.read("verl/utils/experimental/torch_functional.py").decode()
    spec = importlib.util.spec_from_loader("verl_torch_functional", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, "verl/utils/experimental/torch_functional.py", "exec"), mod.__dict__)
    return mod.FusedLinearForPPO


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_verl_fused_forward_parity(layout):
    Verl = _verl_reference()
    from exgrpo_kernels.integrations.verl import FusedLinearForPPO
    g = torch.Generator().manual_seed(5)
    shape = (3, 11, 16) if layout == "padded" else (1, 29, 16)
    h0 = torch.randn(*shape, generator=g)
    w0 = torch.randn(61, 16, generator=g) * 0.5
    ids = torch.randint(0, 61, shape[:2], generator=g)
    up = torch.randn(*shape[:2], 2, generator=g)
    out = {}
    for name, mod in (("verl", Verl(chunk_size=7)), ("ours", FusedLinearForPPO())):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        lp, ent = mod(h, w, ids, 0.8)
        ((lp * up[..., 0]).sum() + (ent * up[..., 1]).sum()).backward()
        out[name] = (lp, ent, h.grad, w.grad)
    for i, (a, b) in enumerate(zip(out["ours"], out["verl"])):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5, f"output {i}"


def test_verl_patched_model_forward():
    from exgrpo_kernels.integrations.verl import patch_model
    m = _tiny_causal_lm("gemma2")
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = m(input_ids=ids).logits.double() / 0.7
        rolled = torch.roll(ids, -1, -1)
        want = torch.log_softmax(logits, -1).gather(-1, rolled[..., None])[..., 0]
    patch_model(m)
    o = m(input_ids=ids, temperature=0.7)
    assert torch.allclose(o.log_probs.double(), want, atol=1e-5) and o.entropy.shape == (2, 12)


# ----------------------------------------------------------------------------------------------------- OpenRLHF


def _openrlhf_reference(model, sequences, action_mask, attention_mask, temperature):
    """OpenRLHF 0.11.2 Actor.forward, unpacked path, written out: fp32 logits / temperature, log-probs of the
    rolled sequence, the last position dropped, the action slice times the action mask."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    logits = model(sequences, attention_mask=attention_mask, position_ids=position_ids)["logits"].float() / temperature
    lp = torch.log_softmax(logits, -1).gather(-1, torch.roll(sequences, -1, 1)[..., None])[..., 0][:, :-1]
    return lp[:, -action_mask.shape[1]:] * action_mask.float()


def test_openrlhf_fused_actor_against_its_formulas():
    from exgrpo_kernels.integrations.openrlhf import FusedActor
    g = torch.Generator().manual_seed(8)
    seqs = torch.randint(0, 97, (3, 15), generator=g)
    att = torch.ones_like(seqs)
    att[0, :3] = 0  # left padding
    amask = (torch.rand(3, 6, generator=g) > 0.2)
    out = {}
    for name in ("openrlhf", "ours"):
        m = _tiny_causal_lm("llama")
        if name == "ours":
            lp = FusedActor(m, temperature=0.8)(seqs, action_mask=amask, attention_mask=att)
        else:
            lp = _openrlhf_reference(m, seqs, amask, att, 0.8)
        lp.sum().backward()
        out[name] = [lp] + [p.grad for p in m.parameters()]
    for i, (a, b) in enumerate(zip(out["ours"], out["openrlhf"])):
        assert rel_err(a, b) < 1e-5, f"output {i}"
    with pytest.raises(NotImplementedError, match="ring-attention packing"):
        FusedActor(_tiny_causal_lm())(seqs, action_mask=amask, attention_mask=att, packed_seq_lens=[15])
