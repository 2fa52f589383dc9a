"""Generation backends and multi-turn, token-in/token-out rollouts.

A backend turns prompts given as token ids into completions given as token ids with the generator's log-prob
of each token, log softmax(logits / temperature) — the same quantity the trainer computes, so the two can be
compared and the generator correction can use it. ``TransformersBackend`` (default on the CPU) runs the
trainer's own model; ``exgrpo.vllm_backend.VLLMBackend`` runs vLLM.

``multi_turn_rollouts`` advances all trajectories of a step turn by turn: one batched request per turn, the
next user turn (probe) appended as token ids from the dialogue tokenizer.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from exgrpo import distributed
from exgrpo.attention import IMPL
from exgrpo.config import SamplingConfig
from exgrpo.dialogue import DialogueTokenizer, TokenizedDialogue
from exgrpo.model import base_causal_lm


@dataclass
class Completion:
    ids: list[int]  # generated ids, up to and including the end-of-turn token if one was sampled
    logprobs: list[float]  # generator log-prob of each id under softmax(logits / temperature)


class GenerationBackend(abc.ABC):
    """What the trainer and the evaluation need from a generator.

    generate: prompts as token ids -> one Completion per prompt: the sampled ids (token-out, never re-tokenized)
        with the generator's log-prob of each, log softmax(logits / temperature)[id] (the trainer's quantity).
    sync_weights: make the generator sample from the policy's current weights (after every optimizer step).
    sleep / wake_up: free and re-take the generator's GPU memory around the training phase (no-ops where the
        generator holds none of its own).
    close: release the generator (engine, server session, temporary files).
    """

    name: str = "backend"

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sc: SamplingConfig, greedy: bool = False,
                 generator_seed: int | None = None) -> list[Completion]:
        ...

    @abc.abstractmethod
    def sync_weights(self, model) -> None:
        ...

    def sleep(self) -> None:
        """Free generation memory during the training phase."""

    def wake_up(self) -> None:
        """Take generation memory back (generate calls it where needed)."""

    def close(self) -> None:
        """Release the generator."""


class TransformersBackend(GenerationBackend):
    """Generation with the trainer's own model object (weights always in sync), left-padded batches."""

    name = "transformers"

    def __init__(self, model, tokenizer, eot_ids, batch_size: int = 64, autocast_dtype: torch.dtype | None = None,
                 sync_ranks: bool = False, fsdp_root=None):
        self.model, self.tok, self.eot = model, tokenizer, set(eot_ids)
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype  # generate in the trainer's precision: its log-probs then match
        # a sharded (FSDP2) model: every forward is collective, so all ranks make the same calls in lockstep
        self.sync_ranks = sync_ranks
        self.fsdp_root = fsdp_root  # FSDP2: the sharded root, whose own parameters (embeddings, head) generate gathers

    def sync_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sc: SamplingConfig, greedy: bool = False,
                 generator_seed: int | None = None) -> list[Completion]:
        lm = base_causal_lm(self.model)
        was_training = lm.training
        lm.eval()
        lm.set_attn_implementation("sdpa")
        dev = next(lm.parameters()).device
        if self.fsdp_root is not None:
            self.fsdp_root.unshard()
        try:
            out = []
            n_calls = -(-len(prompts) // self.batch_size)
            if self.sync_ranks:
                n_calls = int(distributed.all_max(n_calls))
            with torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
                for c in range(n_calls):
                    chunk = prompts[c * self.batch_size:(c + 1) * self.batch_size]
                    if chunk:
                        out += self._generate(lm, chunk, sc, greedy, generator_seed)
                    else:  # this rank has nothing left: a dummy call keeps the ranks' collectives paired
                        self._generate(lm, [[self.tok.pad_token_id]], sc, greedy, generator_seed)
            return out
        finally:
            if self.fsdp_root is not None:
                self.fsdp_root.reshard()
            lm.set_attn_implementation(IMPL)
            lm.train(was_training)

    def _generate(self, lm, prompts, sc, greedy, seed):
        dev = next(lm.parameters()).device
        T = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.full((len(prompts), T), pad, dtype=torch.long)
        att = torch.zeros((len(prompts), T), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - len(p):] = torch.tensor(p)
            att[i, T - len(p):] = 1
        if seed is not None:
            torch.manual_seed(seed)
        kw = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=sc.temperature, top_p=sc.top_p,
                                                      top_k=sc.top_k)  # top_k 0 and top_p 1 switch those off
        rec = LogProbRecorder(1.0 if greedy else sc.temperature)
        g = lm.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), max_new_tokens=sc.max_new_tokens,
                        eos_token_id=sorted(self.eot), pad_token_id=pad, logits_processor=LogitsProcessorList([rec]),
                        return_dict_in_generate=True, synced_gpus=self.sync_ranks, **kw)
        new = g.sequences[:, T:]
        lp = rec.finish(new).cpu()
        new = new.cpu()
        res = []
        for b in range(new.shape[0]):
            seq = new[b].tolist()
            n = len(seq)
            for j, t in enumerate(seq):
                if t in self.eot:
                    n = j + 1
                    break
            res.append(Completion(seq[:n], lp[b, :n].tolist()))
        return res


class LogProbRecorder(LogitsProcessor):
    """The generator's log-prob of every sampled token, log softmax(logits / tau)[token], taken from the raw logits
    (custom processors run before transformers' temperature / top-k / top-p warpers, so truncation never enters it:
    the trainer's quantity). One step's [B, V] log-softmax is kept until the next step's input reveals the token
    sampled from it, so memory is O(B x V), not the O(B x steps x V) of ``output_logits``."""

    def __init__(self, tau: float):
        self.tau = tau
        self.prev: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.tau, -1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.out.append(self.prev.gather(-1, tokens[:, None].to(self.prev.device))[:, 0])
        self.prev = None

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[B, steps] fp32 log-probs of the generated tokens ``new_tokens`` [B, steps]."""
        if self.prev is not None:
            self._take(new_tokens[:, -1])
        steps = new_tokens.shape[1]
        if not self.out:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.out[:steps], 1)


def multi_turn_rollouts(backend, dtok: DialogueTokenizer, user_turns: list[list[str]], sc: SamplingConfig,
                        greedy: bool = False, seed: int | None = None) -> list[TokenizedDialogue]:
    """One dialogue per entry of ``user_turns`` (its user messages in order); the student answers each user
    turn. All dialogues advance together, one batched generate call per turn."""
    states = [dtok.start([{"role": "user", "content": turns[0]}]) for turns in user_turns]
    n_turns = max((len(u) for u in user_turns), default=0)
    if getattr(backend, "sync_ranks", False):
        n_turns = int(distributed.all_max(n_turns))
    for t in range(n_turns):
        active = [i for i, u in enumerate(user_turns) if t < len(u)]
        if t > 0:
            for i in active:
                dtok.append_user(states[i], user_turns[i][t])
        comps = backend.generate([dtok.prompt_ids(states[i]) for i in active], sc, greedy=greedy,
                                 generator_seed=None if seed is None else seed * 1009 + t)
        for i, c in zip(active, comps):
            dtok.append_generated(states[i], c.ids, c.logprobs)
    return states


def last_assistant_text(dtok: DialogueTokenizer, d: TokenizedDialogue) -> str:
    last = max(i for i, r in enumerate(d.roles) if r == "assistant")
    ids = [t for t, g, m in zip(d.input_ids, d.generated, d.message_index) if g and m == last]
    return dtok.tok.decode(ids, skip_special_tokens=True)


def assistant_texts(dtok: DialogueTokenizer, d: TokenizedDialogue) -> list[str]:
    """The text of every generated assistant turn, in order."""
    turns = [i for i, r in enumerate(d.roles) if r == "assistant"]
    return [dtok.tok.decode([t for t, g, m in zip(d.input_ids, d.generated, d.message_index) if g and m == k],
                            skip_special_tokens=True) for k in turns]


def assistant_turn_ids(d: TokenizedDialogue) -> list[int]:
    """[T]: for each token, the index of the assistant turn it belongs to (0, 1, ...), -1 outside assistant turns."""
    order = {}
    for i, r in enumerate(d.roles):
        if r == "assistant":
            order[i] = len(order)
    return [order.get(m, -1) for m in d.message_index]
