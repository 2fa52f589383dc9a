"""Greedy accuracy: the student answers each question directly, in one pass (probes are a training device only).
Used by ``exgrpo eval``, by the trainer's periodic evaluation (``TrainConfig.eval_every``) and by the demo."""
from __future__ import annotations

import json
import os

from exgrpo.config import SamplingConfig
from exgrpo.data.answers import is_correct
from exgrpo.data.loaders import Example
from exgrpo.dialogue import DialogueTokenizer
from exgrpo.generation import GenerationBackend, TransformersBackend, last_assistant_text, multi_turn_rollouts
from exgrpo.tasks.arithmetic import make_split


def evaluate(model, tok, examples: list[Example], *, batch_size: int = 64, max_new_tokens: int = 96,
             backend: GenerationBackend | None = None, answers: list | None = None) -> dict:
    """{data set: {"accuracy", "correct", "n"}} of greedy answers to ``examples`` asked directly. With vLLM every
    question goes in one batched request; with transformers, batches of ``batch_size``. ``answers``: a list that
    receives each example's generated answer text, in order."""
    dtok = DialogueTokenizer(tok)
    backend = backend or TransformersBackend(model, tok, dtok.eot, batch_size=batch_size)
    sc = SamplingConfig(max_new_tokens=max_new_tokens)
    step = len(examples) if not isinstance(backend, TransformersBackend) else batch_size
    res: dict = {}
    for i in range(0, len(examples), max(1, step)):
        chunk = examples[i:i + step]
        ds = multi_turn_rollouts(backend, dtok, [[e.question] for e in chunk], sc, greedy=True)
        for e, d in zip(chunk, ds):
            text = last_assistant_text(dtok, d)
            if answers is not None:
                answers.append(text)
            r = res.setdefault(e.dataset, [0, 0])
            r[0] += is_correct(text, e.answer, e.answer_type)
            r[1] += 1
    return {k: {"accuracy": c / n, "correct": c, "n": n} for k, (c, n) in res.items()}


def eval_examples(spec: str, field_name: str = "eval_data") -> list[Example]:
    """The examples a spec names: ``arithmetic:N:SEED[:OPS]`` (N held-in test questions of the built-in domain, and N
    paraphrased ones: the out-of-distribution split) or a JSONL file of examples in the loaders' schema."""
    if spec.startswith("arithmetic:"):
        parts = spec.split(":")[1:]
        try:
            n, seed, ops = int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 1
        except (IndexError, ValueError):
            raise ValueError(f"{field_name}: {spec!r} is not arithmetic:N:SEED[:OPS]") from None
        return make_split(n, seed, "test", n_ops=ops) + make_split(n, seed, "paraphrase", n_ops=ops)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"{field_name}: no such file {spec!r} (arithmetic:N:SEED or a JSONL of examples)")
    fields = set(Example.__dataclass_fields__)
    with open(spec) as f:
        return [Example(**{k: v for k, v in json.loads(x).items() if k in fields}) for x in f if x.strip()]
