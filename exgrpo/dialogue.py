"""Multi-turn dialogues as token ids, with the tokenizer's own chat template.

``DialogueTokenizer.encode(messages)`` returns ids equal to ``apply_chat_template(messages)`` (asserted)
and, per token, the message it belongs to and whether an assistant generates it (its content and its
end-of-turn token; not the role header, not the template's glue). The loss mask picks those tokens of
all assistant turns or of the last one only.

Rollouts are token-in, token-out: ``start`` encodes the prompt messages, ``prompt_ids`` adds the assistant
header, ``append_generated`` appends the sampled ids exactly as sampled (never re-tokenized from text) and
``append_user`` appends the template's tokens for the next user turn (the next probe). Those template
pieces are cut from renderings of a fixed two-turn context, so they do not depend on how earlier
generated text would re-tokenize.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class TokenizedDialogue:
    """One dialogue as tokens. T = len(input_ids).

    input_ids:     [T] token ids
    message_index: [T] index of the message (turn) each token belongs to, headers and glue included
    generated:     [T] True for tokens an assistant produces (content + end-of-turn)
    roles:         role of each message
    logprobs:      [T] generator log-prob of each generated token (0.0 elsewhere), for rollouts
    truncated:     per assistant turn, True where it was cut off before its end-of-turn token
    """

    input_ids: list[int] = field(default_factory=list)
    message_index: list[int] = field(default_factory=list)
    generated: list[bool] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    open_assistant: bool = False  # the last assistant turn has no glue yet (a user turn may follow)

    def __len__(self):
        return len(self.input_ids)

    def _extend(self, ids, msg, gen, logprobs=None):
        self.input_ids.extend(ids)
        self.message_index.extend([msg] * len(ids))
        self.generated.extend([gen] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))

    def token_mask(self, turns: str = "all") -> list[bool]:
        """[T] tokens trained on: generated tokens of every assistant turn ("all") or of the last one ("last")."""
        if turns == "all":
            return list(self.generated)
        if turns == "last":
            last = max((i for i, r in enumerate(self.roles) if r == "assistant"), default=-1)
            return [g and m == last for g, m in zip(self.generated, self.message_index)]
        raise ValueError(f"turns must be 'all' or 'last', got {turns!r}")

    def tensors(self, turns: str = "all"):
        """(input_ids [T] int64, token_mask [T] bool), ready for kernels.pack_sequences."""
        return torch.tensor(self.input_ids, dtype=torch.int64), torch.tensor(self.token_mask(turns), dtype=torch.bool)


class DialogueTokenizer:
    """Wraps a transformers tokenizer that has a chat template.

    end_of_turn_ids: token ids that end an assistant turn (default: the eos token and the known end-of-turn
    specials the vocabulary has).
    """

    def __init__(self, tokenizer, end_of_turn_ids=None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer has no chat_template")
        self.tok = tokenizer
        if end_of_turn_ids is None:
            vocab = tokenizer.get_vocab()
            end_of_turn_ids = {vocab[t] for t in KNOWN_END_OF_TURN if t in vocab}
            if tokenizer.eos_token_id is not None:
                end_of_turn_ids.add(tokenizer.eos_token_id)
        self.eot = set(int(x) for x in end_of_turn_ids)
        if not self.eot:
            raise ValueError("no end-of-turn token: pass end_of_turn_ids")
        self.turn_end_id = tokenizer.eos_token_id if tokenizer.eos_token_id in self.eot else min(self.eot)
        # template pieces from a fixed context, for token-in/token-out rollouts
        ctx_u = [{"role": "user", "content": "u"}]
        ctx = ctx_u + [{"role": "assistant", "content": "a"}]
        base = self.render(ctx_u)
        with_prompt = self.render(ctx_u, add_generation_prompt=True)
        self._check_prefix(base, with_prompt, "the generation prompt")
        self.assistant_header = with_prompt[len(base):]
        full = self.render(ctx)
        self._check_prefix(with_prompt, full, "an assistant turn")
        _, self.assistant_glue = self._split_generated(full[len(with_prompt):])
        self._ctx, self._ctx_ids = ctx, full

    # ------------------------------------------------------------------ rendering

    def render(self, messages, add_generation_prompt: bool = False) -> list[int]:
        out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(x) for x in out]

    @staticmethod
    def _check_prefix(a, b, what):
        if b[:len(a)] != a:
            raise ValueError(f"chat template is not incremental at {what}: the rendering of the shorter dialogue is "
                             f"not a token prefix of the longer one, so turns cannot be tokenized one at a time")

    def _split_generated(self, body):
        """Assistant body -> (generated: up to and including the first end-of-turn, glue: the rest)."""
        for i, t in enumerate(body):
            if t in self.eot:
                return body[:i + 1], body[i + 1:]
        return body, []

    # ------------------------------------------------------------------ whole dialogues

    def encode(self, messages, *, check: bool = True) -> TokenizedDialogue:
        """All messages at once (SFT data). ids == apply_chat_template(messages) is asserted when check."""
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{k}] must be a dict with 'role' and 'content', got {m!r}")
        d = TokenizedDialogue(roles=[m["role"] for m in messages])
        prev: list[int] = []
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self.render(messages[:k], add_generation_prompt=True) if k else []
                self._check_prefix(prev, head, f"message {k} (header)")
                d._extend(head[len(prev):], k, False)
                full = self.render(messages[:k + 1])
                self._check_prefix(head, full, f"message {k}")
                gen, glue = self._split_generated(full[len(head):])
                d._extend(gen, k, True)
                d._extend(glue, k, False)
            else:
                full = self.render(messages[:k + 1])
                self._check_prefix(prev, full, f"message {k}")
                d._extend(full[len(prev):], k, False)
            prev = full
        if check and d.input_ids != self.render(messages):
            raise AssertionError("turn-by-turn ids differ from apply_chat_template of the whole dialogue")
        return d

    # ------------------------------------------------------------------ token-in / token-out rollouts

    def start(self, messages) -> TokenizedDialogue:
        """The prompt part of a rollout (system/user messages), as a dialogue to extend."""
        return self.encode(messages)

    def prompt_ids(self, d: TokenizedDialogue) -> list[int]:
        """What the generator continues: the dialogue so far plus the assistant header."""
        return d.input_ids + self.assistant_header

    def append_generated(self, d: TokenizedDialogue, ids, logprobs=None) -> None:
        """Append an assistant turn exactly as sampled. A turn cut off before its end-of-turn token gets one
        (not trained: the model did not produce it), so the next turn sees a well-formed context."""
        ids = [int(x) for x in ids]
        k = len(d.roles)
        d.roles.append("assistant")
        d._extend(self.assistant_header, k, False)
        d._extend(ids, k, True, logprobs)
        d.truncated.append(not ids or ids[-1] not in self.eot)
        if d.truncated[-1]:
            d._extend([self.turn_end_id], k, False)
        d.open_assistant = True

    def append_user(self, d: TokenizedDialogue, content: str) -> None:
        """Append a user turn (e.g. the next probe) as the template renders it after an assistant turn."""
        k = len(d.roles)
        if not d.roles or d.roles[-1] != "assistant":
            raise ValueError("append_user follows an assistant turn; the dialogue's last message is "
                             f"{d.roles[-1] if d.roles else 'none'!r}")
        if d.open_assistant:
            d._extend(self.assistant_glue, k - 1, False)
            d.open_assistant = False
        after = self.render(self._ctx + [{"role": "user", "content": content}])
        self._check_prefix(self._ctx_ids, after, "a user turn after an assistant turn")
        d.roles.append("user")
        d._extend(after[len(self._ctx_ids):], k, False)
