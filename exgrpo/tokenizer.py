"""Tokenizers made by the project, with no download: a byte-level tokenizer (one token per byte, ids 0..255
are the bytes) for the built-in demo student, and a small trained byte-level BPE for tests that need real
merges. Both carry a chat template (ChatML/Qwen style or Llama-3 style) whose assistant turns are wrapped in
``{% generation %}`` so that transformers can report which tokens the model generates."""
from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CHATML = (
    "{% for m in messages %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ m['content'] | trim }}<|eot_id|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
STYLES = {
    "chatml": dict(template=CHATML, specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   bos=None, eos="<|im_end|>", pad="<|endoftext|>"),
    "llama3": dict(template=LLAMA3, specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                              "<|end_header_id|>", "<|eot_id|>"],
                   bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>"),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _wrap(tok, style: str) -> PreTrainedTokenizerFast:
    if style not in STYLES:
        raise ValueError(f"style must be one of {sorted(STYLES)}, got {style!r}")
    s = STYLES[style]
    tok.add_special_tokens(s["specials"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=s["bos"], eos_token=s["eos"], pad_token=s["pad"],
                                   chat_template=s["template"])


def byte_tokenizer(style: str = "chatml") -> PreTrainedTokenizerFast:
    """One token per byte (id = byte value), plus the style's special tokens after 255."""
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok, style)


def trained_bpe_tokenizer(texts, vocab_size: int = 1000, style: str = "chatml") -> PreTrainedTokenizerFast:
    """A byte-level BPE with GPT-2's pre-tokenizer regex, trained on ``texts`` (real merges, as in Qwen/Llama)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _wrap(tok, style)


@functools.lru_cache(maxsize=4)
def arithmetic_tokenizer(style: str = "chatml", vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the built-in arithmetic domain's text (questions of every split and phrasing,
    rationales, all probe kinds): words and most numbers become single tokens, so the demo's dialogues are about
    5x shorter than byte-level ones. Deterministic: the corpus is generated from fixed seeds."""
    from exgrpo.tasks.arithmetic import tokenizer_corpus
    return trained_bpe_tokenizer(tokenizer_corpus(), vocab_size=vocab_size, style=style)
