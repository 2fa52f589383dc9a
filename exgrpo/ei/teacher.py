"""Teachers for Explanatory Inversion.

* ``ChatClient``: any OpenAI-compatible chat endpoint through the ``openai`` package (a ``vllm serve`` of a
  large open model, or a hosted API): bounded concurrency; the openai client's own retries (408 / 409 / 429 /
  5xx, timeouts and dropped connections, exponential backoff with jitter, honouring Retry-After); a clear
  ``TeacherError`` once they are spent, and at once on other 4xx; a timeout per request. The key is read from an
  environment variable and never logged or shown in errors.
* ``TransformersChat``: a local ``transformers`` model behind the same ``chat_many`` interface (offline).
* ``LLMTeacher``: the EI teacher on top of any chat client: rationales, probes (the rule's prompt), the
  probe's rationale and answer, and the consistency check (Eq. 1).
* ``exgrpo.tasks.arithmetic.SymbolicTeacher``: the exact teacher of the built-in domain, same batch interface.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor

import torch

from exgrpo.config import ChatConfig
from exgrpo.data.answers import extract_answer, is_correct
from exgrpo.rules import RULES, Probe, probe_answer_type
from exgrpo.tasks.arithmetic import SymbolicTeacher

log = logging.getLogger(__name__)


class TeacherError(RuntimeError):
    """A teacher request failed for good (a 4xx, or retries exhausted)."""


class ChatClient:
    def __init__(self, cfg: ChatConfig):
        import openai  # only the openai teacher needs it
        self.cfg = cfg
        self._openai = openai
        self._client = openai.OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
                                     timeout=cfg.timeout_s, max_retries=cfg.max_retries)
        self.calls = 0

    def __repr__(self):  # never the key
        return f"ChatClient(base_url={self.cfg.base_url!r}, model={self.cfg.model!r})"

    def chat(self, messages: list[dict], **kw) -> str:
        o = self._openai
        retried = (o.RateLimitError, o.InternalServerError, o.APITimeoutError, o.APIConnectionError)
        self.calls += 1
        try:
            r = self._client.chat.completions.create(
                model=self.cfg.model, messages=messages, temperature=kw.get("temperature", self.cfg.temperature),
                max_tokens=kw.get("max_tokens", self.cfg.max_tokens), extra_body=kw.get("extra_body"))
            return r.choices[0].message.content or ""
        except retried as e:  # the client's retries are spent
            raise TeacherError(f"teacher at {self.cfg.base_url} failed after {self.cfg.max_retries + 1} tries: "
                               f"{type(e).__name__}: {_status(e)}") from None
        except o.APIStatusError as e:  # other 4xx: the request itself is wrong; the client does not retry it
            raise TeacherError(f"teacher at {self.cfg.base_url} rejected the request for model "
                               f"{self.cfg.model!r}: HTTP {e.status_code}: {_status(e)}") from None

    def chat_many(self, conversations: list[list[dict]], **kw) -> list[str]:
        """Many chats, at most max_concurrency in flight, answers in order. The first failure is raised."""
        if not conversations:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.max_concurrency, len(conversations))) as ex:
            return list(ex.map(lambda m: self.chat(m, **kw), conversations))


def _status(e) -> str:
    msg = getattr(e, "message", None) or str(e)
    return re.sub(r"(sk-|Bearer\s+)\S+", r"\1***", msg)[:300]


class TransformersChat:
    """A local transformers causal LM as a chat teacher (greedy by default), same interface as ChatClient."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 256, batch_size: int = 8):
        self.model, self.tok = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def chat_many(self, conversations, **kw) -> list[str]:
        out = []
        self.tok.padding_side = "left"
        for i in range(0, len(conversations), self.batch_size):
            batch = conversations[i:i + self.batch_size]
            texts = [self.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in batch]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=kw.get("max_tokens", self.max_new_tokens), do_sample=False,
                                          pad_token_id=self.tok.pad_token_id)
            out += self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    def chat(self, messages, **kw) -> str:
        return self.chat_many([messages], **kw)[0]


SOLVE = "Solve the question step by step. End with: The answer is <answer>."


class LLMTeacher:
    """EI teacher on a chat client (ChatClient, TransformersChat, or the vLLM backend)."""

    def __init__(self, client):
        self.client = client

    def rationales(self, examples) -> list[str]:
        return self.client.chat_many([[{"role": "system", "content": SOLVE}, {"role": "user", "content": e.question}]
                                      for e in examples])

    def probes(self, items) -> list[Probe | None]:
        """items: [(example, rationale, rule)] -> the probe with the teacher's rationale and answer, or None when
        the teacher's reply has no probe or its answer cannot be read."""
        prompts = [[{"role": "user", "content": RULES[r].template.format(question=e.question, answer=e.answer,
                                                                          rationale=rat)}] for e, rat, r in items]
        texts = self.client.chat_many(prompts)
        qs = []
        for t in texts:
            m = re.search(r"Probe:\s*(.+)", t, re.S)
            qs.append(m.group(1).strip() if m else None)
        todo = [i for i, q in enumerate(qs) if q]
        answers = self.client.chat_many([[{"role": "system", "content": SOLVE}, {"role": "user", "content": qs[i]}]
                                         for i in todo])
        out: list[Probe | None] = [None] * len(items)
        for i, a in zip(todo, answers):
            e, _, rule = items[i]
            at = probe_answer_type(rule, e.answer_type)
            val = extract_answer(a, at)
            if val is None:
                continue
            shown = str(val.numerator if getattr(val, "denominator", 2) == 1 else val) if at == "number" else str(val)
            out[i] = Probe(rule, qs[i], a.strip(), shown, at)
        return out

    def consistent(self, items) -> list[bool]:
        """Eq. 1: with [probe, rationale] as context, the teacher answers the original question correctly."""
        convs = [[{"role": "system", "content": SOLVE}, {"role": "user", "content": p.question},
                  {"role": "assistant", "content": p.rationale}, {"role": "user", "content": e.question}]
                 for e, p in items]
        return [is_correct(t, e.answer, e.answer_type) for t, (e, _) in zip(self.client.chat_many(convs), items)]


class SymbolicBatchTeacher:
    """The arithmetic domain's exact teacher with the batch interface of LLMTeacher.

    noise: the probability that a probe's rationale ends in a wrong answer, as an LLM teacher's sometimes does
    (keyed by the example and rule: the same probes on every run); the consistency filter has to catch these.
    """

    def __init__(self, noise: float = 0.0):
        if not 0 <= noise <= 1:
            raise ValueError(f"teacher noise must be in [0, 1], got {noise}")
        self.t, self.noise = SymbolicTeacher(), noise

    def rationales(self, examples):
        return [self.t.rationale(e) for e in examples]

    def probes(self, items):
        out = []
        for e, _, rule in items:
            p = self.t.probe(e, rule)
            if self.noise and random.Random(f"noise-{e.id}-{rule}").random() < self.noise:
                p = _wrong_ending(p)
            out.append(p)
        return out

    def consistent(self, items):
        return [self.t.consistent(e, p) for e, p in items]


def _wrong_ending(p: Probe) -> Probe:
    """The probe with its rationale's final answer replaced by a wrong one (the probe's own answer unchanged)."""
    a = p.answer
    if a.lstrip("-").isdigit():
        wrong = str(int(a) + 1)
    elif a in ("yes", "no"):
        wrong = "no" if a == "yes" else "yes"
    elif len(a) == 1 and a.isalpha():
        wrong = "B" if a != "B" else "A"
    else:
        wrong = a + "0"
    ending = f"The answer is {a}."
    r = p.rationale[:-len(ending)] if p.rationale.rstrip().endswith(ending) else p.rationale + " "
    return dataclasses.replace(p, rationale=r.rstrip() + f" The answer is {wrong}.")
