"""The GRPO policy loss straight from hidden states: log-probs, importance ratio, the policy objective (clip, cispo,
sapo, vespo), KL to the reference policy, generator corrections, group advantages gathered per token, aggregation,
forward and backward, without the [N, V] logits.

Layout (one op, one folder): ``config.py`` (GRPOLossConfig and the routing it implies), ``losses.py`` (the per-token
functions of every variant), ``rows.py`` (the one-row token kernel: Triton, its torch twin), ``passes.py`` (the
one- and two-pass drivers over logits tiles), ``ops.py`` (the custom ops, fakes, autograd), ``api.py``
(``fused_linear_grpo_loss``), ``naive.py`` (the plain-torch reference).

Matmul counts (one = [N, H] x [H, V]); see ``docs/kernels.md``:
  * fast mode, token-level terms: 3. Each [chunk, V] logits tile is reduced and turned into its own gradient while
    it is in memory (the per-token gradient is known in the forward: every aggregation weight follows from the mask),
    then grad-hidden and grad-weight GEMMs; grad-weight accumulates in an fp32 [V, H] buffer.
  * a sequence statistic of the current log-probs (sequence-level ratio, vespo, the off-policy mask, a sequence-level
    generator correction without old log-probs): 4. A first pass gets every log-prob, then a second pass recomputes
    the tiles (3 when every active row fits one tile: the second pass takes the first pass's tile).
  * low_memory mode: 4. The forward reduces tiles to log-probs; the backward walks vocabulary slabs (grad-weight of
    a slab is one full-K GEMM, written once), so there is no fp32 [V, H] buffer.
  * a weight that does not require grad: 2 (3 with a sequence statistic).
Rows that the loss does not cover (loss_mask 0, or target -100) are dropped before any GEMM.
"""
from .api import fused_linear_grpo_loss, grpo_metrics
from .config import GEN_CORRECTIONS, IMPORTANCE_LEVELS, KL_ESTIMATORS, LOSS_TYPES, MEMORY_MODES, GRPOLossConfig
from .losses import policy_terms, seq_weights
from .naive import grpo_loss_reference

__all__ = ["GRPOLossConfig", "fused_linear_grpo_loss", "grpo_loss_reference", "grpo_metrics", "policy_terms",
           "seq_weights", "LOSS_TYPES", "IMPORTANCE_LEVELS", "KL_ESTIMATORS", "GEN_CORRECTIONS", "MEMORY_MODES"]
