"""GRPOLossConfig: every choice that defines the GRPO policy loss, validated once, and the routing it implies."""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

from .._utils import KERNEL_BACKENDS

# TRL 1.16 / Liger-Kernel 0.8.5 loss types: each one a policy objective and an aggregation (docs/kernels.md)
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
OBJECTIVE = {"grpo": "clip", "bnpo": "clip", "dr_grpo": "clip", "dapo": "clip", "luspo": "clip", "cispo": "cispo",
             "sapo": "sapo", "vespo": "vespo"}
AGGREGATION = {"grpo": "seq_mean", "sapo": "seq_mean", "bnpo": "token_mean", "dr_grpo": "constant",
               "dapo": "global_tokens", "cispo": "global_tokens", "vespo": "global_tokens", "luspo": "seq_sum"}
IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
GEN_CORRECTIONS = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
MEMORY_MODES = ("fast", "low_memory")


@dataclass(frozen=True)
class GRPOLossConfig:
    """Everything that defines the GRPO policy loss (docs/kernels.md, "The GRPO loss per token").

    loss_type: the policy objective and the aggregation, TRL's names. Objectives: the clipped ratio (grpo, bnpo,
        dr_grpo, dapo, luspo), cispo (clipped, detached ratio times the log-prob), sapo (a sigmoid gate instead of
        the clip), vespo (a detached gamma weight of the sequence ratio times the log-prob). Aggregations: "grpo" and
        "sapo" the mean over sequences of each sequence's token mean; "bnpo" the token mean of the micro-batch;
        "dr_grpo" the token sum / (S * max_completion_length); "dapo", "cispo", "vespo" the token sum /
        num_global_tokens (the masked tokens of the whole global batch); "luspo" the token sum / S. Default "dapo".
    importance_sampling: "token" (rho per token) or "sequence" (rho_i = exp(mean_t (l - l_old)), GSPO); cispo,
        sapo and vespo are token-level only.
    eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high]; for cispo eps_high is the ratio's upper bound itself
        (TRL suggests 5.0) and eps_low is unused. Defaults 0.2, 0.2.
    delta: optional upper cap of rho in the unclipped term (two-sided clipping, clip objective); None = off.
    beta, kl_estimator: KL(pi || pi_ref) weight and estimator (k1, k2, k3), d = l_ref - l. Default 0.04, k3.
    use_bias_correction_kl: multiply the KL term by the (unclipped) importance ratio rho (DeepSeek-V3.2).
    sapo_temperature_pos, sapo_temperature_neg: sapo's gate temperatures for A > 0 and A <= 0. Defaults 1.0, 1.05.
    vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg: vespo's gamma shape k and rate lambda for A >= 0
        and A < 0. Defaults 2.0, 3.0, 3.0, 2.0.
    temperature: sampling temperature tau; log-probs are of softmax(logits / tau).
    max_completion_length: the constant denominator of "dr_grpo" (required there).
    gen_correction: importance sampling between trainer and generator (vLLM) log-probs, TRL's
        vllm_importance_sampling_mode: "off", "token_truncate" / "token_mask" (r_t = exp(l_old - l_gen)),
        "sequence_truncate" / "sequence_mask" (r_i = exp(sum_t (l_old - l_gen))); truncate clamps r to
        [gen_correction_min, gen_correction_cap], mask zeroes r outside that range. The weight multiplies the policy
        term (vespo folds it into its gamma weight). l_old is old_logp, or the current log-probs (detached).
    gen_correction_cap, gen_correction_min: the range's upper bound (default 2.0) and lower bound (None = none).
    off_policy_mask_threshold: DeepSeek-V3.2's off-policy sequence mask: a sequence with A < 0 whose mean
        (l_gen - l) (l_old where no gen_logp is given) exceeds it is dropped from the policy term. None = off.
    entropy_coef: an entropy bonus, J_t -= entropy_coef H_t with the policy term's aggregation weight (its gradient
        formed in the same pass as the rest). Default 0.
    top_entropy_quantile: train the policy term on the tokens whose entropy is in this top fraction of the call's
        tokens (TRL's entropy masking: H_t >= quantile(H, 1 - q)); 1.0 = every token.
    memory_mode: "fast" (fp32 [V, H] grad-weight accumulator, fewest GEMMs) or "low_memory".
    compute_entropy: also report the mean entropy (a metric; costs no GEMM).
    fp32_logits: compute the logits tiles in fp32 (CUDA).
    chunk_size: rows per logits tile (None = automatic: ``_rows.chunk_rows``; on CUDA with the fp32 grad-weight
        accumulator up to half its size, else 256 MiB; 64 MiB on the CPU).
    backend: "auto" (Triton on CUDA; on the CPU the C++ kernels where built, else chunked torch), "triton",
        "native", "torch".
    """

    loss_type: str = "dapo"
    importance_sampling: str = "token"
    eps_low: float = 0.2
    eps_high: float = 0.2
    delta: float | None = None
    beta: float = 0.04
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    temperature: float = 1.0
    max_completion_length: int | None = None
    gen_correction: str = "off"
    gen_correction_cap: float = 2.0
    gen_correction_min: float | None = None
    off_policy_mask_threshold: float | None = None
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    memory_mode: str = "fast"
    compute_entropy: bool = False
    fp32_logits: bool = False
    chunk_size: int | None = None
    backend: str = "auto"

    def __post_init__(self):
        for name, allowed in (("loss_type", LOSS_TYPES), ("importance_sampling", IMPORTANCE_LEVELS),
                              ("kl_estimator", KL_ESTIMATORS), ("gen_correction", GEN_CORRECTIONS),
                              ("memory_mode", MEMORY_MODES), ("backend", KERNEL_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GRPOLossConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        checks = (("eps_low", 0 <= self.eps_low < 1, "in [0, 1)"), ("eps_high", self.eps_high >= 0, ">= 0"),
                  ("delta", self.delta is None or self.delta > 0, "> 0 or None"), ("beta", self.beta >= 0, ">= 0"),
                  ("temperature", self.temperature > 0, "> 0"),
                  ("sapo_temperature_pos", self.sapo_temperature_pos > 0, "> 0"),
                  ("sapo_temperature_neg", self.sapo_temperature_neg > 0, "> 0"),
                  ("vespo_lambda_pos", self.vespo_lambda_pos > 0, "> 0"),
                  ("vespo_lambda_neg", self.vespo_lambda_neg > 0, "> 0"),
                  ("gen_correction_cap", self.gen_correction_cap > 0, "> 0"),
                  ("gen_correction_min", self.gen_correction_min is None
                   or 0 <= self.gen_correction_min < self.gen_correction_cap, "in [0, gen_correction_cap) or None"),
                  ("top_entropy_quantile", 0 < self.top_entropy_quantile <= 1, "in (0, 1]"),
                  ("chunk_size", self.chunk_size is None or self.chunk_size >= 1, ">= 1 or None"))
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"GRPOLossConfig.{name} must be {rule}, got {getattr(self, name)!r}")
        if self.loss_type == "dr_grpo" and not (self.max_completion_length and self.max_completion_length > 0):
            raise ValueError(f"GRPOLossConfig.max_completion_length must be a positive int for loss_type='dr_grpo', "
                             f"got {self.max_completion_length!r}")
        if self.importance_sampling == "sequence" and self.objective != "clip":
            raise ValueError(f"GRPOLossConfig.importance_sampling='sequence' is not defined for loss_type="
                             f"{self.loss_type!r} (token level only, as in TRL and Liger)")
        if self.loss_type == "vespo" and self.gen_correction.startswith("sequence"):
            raise ValueError(f"GRPOLossConfig.gen_correction={self.gen_correction!r} with loss_type='vespo': vespo "
                             f"folds token-level weights into its gamma weight (token_truncate or token_mask, as TRL)")

    def replace(self, **kw) -> GRPOLossConfig:
        return dataclasses.replace(self, **kw)

    @property
    def objective(self) -> str:
        """clip | cispo | sapo | vespo."""
        return OBJECTIVE[self.loss_type]

    @property
    def aggregation(self) -> str:
        """seq_mean | token_mean | constant | global_tokens | seq_sum."""
        return AGGREGATION[self.loss_type]

    @property
    def needs_entropy(self) -> bool:
        """Whether the per-token entropies are computed (reported, or in the loss)."""
        return self.compute_entropy or self.entropy_coef != 0 or self.top_entropy_quantile < 1

    def needs_sequence_pass(self, has_old: bool) -> bool:
        """Whether a token's gradient depends on other tokens' current log-probs (a sequence statistic of l, or the
        entropy quantile of the whole call): then every log-prob is computed first and the tiles are visited
        twice."""
        return (self.importance_sampling == "sequence" or self.loss_type == "vespo"
                or self.off_policy_mask_threshold is not None or self.top_entropy_quantile < 1
                or (self.gen_correction.startswith("sequence") and not has_old))

    def fused_rows(self, has_old: bool) -> bool:
        """Whether the one-row token kernel (Triton / C++) computes this loss's terms and gradient in one visit of
        the tile: the clip objective with the plain KL, and a generator weight it can take precomputed (old_logp
        given) or compute itself (token_truncate without a lower bound). Otherwise each tile is reduced to
        log-probs by the row kernels, the terms are formed on the [chunk] vectors, and the row kernels write the
        tile's gradient (the tile is read twice instead of once; the GEMM count is the same)."""
        if self.objective != "clip" or self.use_bias_correction_kl or self.entropy_coef != 0:
            return False
        return has_old or self.gen_correction == "off" or (self.gen_correction == "token_truncate"
                                                           and self.gen_correction_min is None)

    def key(self) -> str:
        """The config as the custom op's string argument: a JSON object built from the fields' reprs (plain string
        work that torch.compile folds into a constant, also for a config built inside the compiled function)."""
        def val(v):
            if v is None:
                return "null"
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, str):
                return '"' + v + '"'
            return repr(v)
        return "{" + ", ".join('"' + f + '": ' + val(getattr(self, f)) for f in FIELDS) + "}"

    @staticmethod
    def from_key(key: str) -> GRPOLossConfig:
        """The config of a key (parsed once per distinct key: cached)."""
        return _from_key(key)


@functools.lru_cache(maxsize=256)
def _from_key(key: str) -> GRPOLossConfig:
    return GRPOLossConfig(**json.loads(key))


FIELDS = tuple(f.name for f in dataclasses.fields(GRPOLossConfig))  # a constant: key() traces to string work
