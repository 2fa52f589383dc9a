"""On-policy distillation (OPD), the paper's strongest baseline: the student samples, the teacher scores every
sampled token, and the policy loss pulls the student toward the teacher by the per-token reverse KL.

Per generated token t of a rollout (the student's sampling log-prob l_t, the teacher's log-prob l^T_t of the same
token in the same context), the advantage is

    A_t = coef * (l^T_t - l_t)          (a stop-gradient: -coef x the token's reverse-KL estimate)

and the fused GRPO kernel's per-token path takes it (every token its own segment; ratio 1 with one update, so the
gradient is -A_t dl_t: the policy-gradient form of verl's and TRL's on-policy distillation). ``mode=opd`` uses
it alone (coef 1, the question asked directly); ``opd_coef > 0`` in another mode adds it to the sequence's own
advantage (GRPO + distillation). The teacher is a local Hugging Face model (``teacher=``, the student's tokenizer)
or an OpenAI-compatible server that returns ``prompt_logprobs`` (vLLM: ``teacher_url=``).
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from exgrpo.config import ModelConfig, TrainConfig
from exgrpo.model import PolicyHidden, build_student
from exgrpo.steps import StepContext, policy_logprobs


class LocalTeacher:
    """A frozen Hugging Face model on this rank's device; its log-probs come from the fused kernel (no [T, V])."""

    def __init__(self, path: str, student_tok, device, temperature: float = 1.0):
        model, tok = build_student(ModelConfig(path=path), device=device)
        probe = "Probe: 12+30=42?"
        if len(tok) != len(student_tok) or tok.encode(probe) != student_tok.encode(probe):
            raise ValueError(f"teacher: {path!r} has another tokenizer than the student ({len(tok)} vs "
                             f"{len(student_tok)} tokens): on-policy distillation scores the student's own token ids")
        self.model = PolicyHidden(model.requires_grad_(False).eval()).eval()
        self.temperature = temperature

    def logprobs(self, ctx: StepContext, seqs) -> list[torch.Tensor]:
        """[(ids [T_i], mask)] -> [T_i] fp32 each: log p_teacher(token t | tokens < t), 0 for the first."""
        return policy_logprobs(ctx, self.model, seqs, self.temperature)


class ServerTeacher:
    """An OpenAI-compatible server's ``/v1/completions`` with ``prompt_logprobs`` (vLLM): one request per sequence
    (token ids in, the log-prob of each prompt token out), ``max_concurrency`` at a time, retried on connection
    errors; a 4xx or a malformed answer is a one-line error naming the server."""

    def __init__(self, url: str, model: str, max_concurrency: int = 8, timeout: float = 120.0, retries: int = 3):
        self.url, self.model = url.rstrip("/"), model
        self.max_concurrency, self.timeout, self.retries = max_concurrency, timeout, retries

    def _one(self, ids: list[int]) -> torch.Tensor:
        body = json.dumps({"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 1.0,
                           "prompt_logprobs": 0}).encode()
        req = urllib.request.Request(f"{self.url}/completions", data=body, headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    out = json.loads(r.read())
                break
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"teacher_url {self.url}: HTTP {e.code}: {e.read()[:300]!r}") from None
            except OSError as e:
                if attempt == self.retries:
                    raise RuntimeError(f"teacher_url {self.url}: no answer after {self.retries + 1} tries ({e})") from None
        try:
            plp = out["choices"][0]["prompt_logprobs"]
            vals = [0.0] + [float(plp[t][str(ids[t])]["logprob"]) for t in range(1, len(ids))]
        except (KeyError, IndexError, TypeError) as e:
            raise RuntimeError(f"teacher_url {self.url}: no prompt_logprobs for the prompt tokens in its answer "
                               f"({type(e).__name__}: {e}); a vLLM server returns them") from None
        return torch.tensor(vals, dtype=torch.float32)

    def logprobs(self, ctx: StepContext, seqs) -> list[torch.Tensor]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(seqs)))) as ex:
            return list(ex.map(lambda s: self._one(s[0].tolist()), seqs))


def make_teacher(cfg: TrainConfig, student_tok, device):
    """The teacher of mode=opd / opd_coef, or None."""
    if cfg.teacher:
        return LocalTeacher(cfg.teacher, student_tok, device, cfg.loss.temperature)
    if cfg.teacher_url:
        if cfg.loss.temperature != 1.0:
            raise ValueError(f"TrainConfig.teacher_url: the server's prompt_logprobs are at temperature 1; "
                             f"loss.temperature is {cfg.loss.temperature}")
        return ServerTeacher(cfg.teacher_url, cfg.teacher_model)
    return None


def token_advantages(masks, gen_logp, teacher_logp, seq_advantages, coef: float) -> tuple[list, dict]:
    """Per token (S tensors [T_i] fp32): seq_advantages[i] + coef * (l^T - l) on the trained tokens, 0 elsewhere;
    and the metrics opd_reverse_kl (mean of l - l^T over the trained tokens: the reverse KL to the teacher on the
    student's own samples) and opd_token_adv_abs."""
    out, kl, n = [], 0.0, 0
    for m, l, lt, a in zip(masks, gen_logp, teacher_logp, seq_advantages.tolist()):
        m = m.bool()
        d = torch.where(m, lt - l, 0.0)
        out.append(torch.where(m, a + coef * d, 0.0))
        kl += float(-d[m].sum())
        n += int(m.sum())
    metrics = {"opd_reverse_kl": kl / max(1, n),
               "opd_token_adv_abs": sum(float(t.abs().sum()) for t in out) / max(1, n)}
    return out, metrics
