"""Dialogue tokenization: ids equal apply_chat_template for whole multi-turn dialogues, the loss mask equals
the template's own {% generation %} marking, and token-in/token-out rollouts keep sampled ids as sampled."""
import json
import os

import pytest
import torch
from exgrpo_kernels import pack_sequences

from exgrpo.dialogue import DialogueTokenizer
from exgrpo.tokenizer import byte_tokenizer, trained_bpe_tokenizer
from tests.utils import SHARED_DATA


def gsm8k(n):
    with open(os.path.join(SHARED_DATA, "gsm8k", "train.jsonl")) as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def rows():
    return gsm8k(240)


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def dtok(request, rows):
    texts = [r["question"] + "\n" + r["answer"] for r in rows]
    return DialogueTokenizer(trained_bpe_tokenizer(texts, vocab_size=700, style=request.param))


def dialogue(rows, start, turns=4, system=True):
    msgs = [{"role": "system", "content": "Solve step by step."}] if system else []
    for r in rows[start:start + turns]:
        msgs += [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
    return msgs


@pytest.mark.parametrize("start", [0, 17, 101])
@pytest.mark.parametrize("system", [True, False])
def test_encode_equals_template_and_mask_equals_generation_marks(dtok, rows, start, system):
    msgs = dialogue(rows, start, turns=4, system=system)  # 8-9 messages
    d = dtok.encode(msgs)
    hf = dtok.tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert d.input_ids == list(hf["input_ids"])
    assert [int(x) for x in d.token_mask("all")] == list(hf["assistant_masks"])
    # every assistant turn's generated tokens decode to its content plus the end-of-turn token
    for k, m in enumerate(msgs):
        if m["role"] == "assistant":
            ids = [t for t, g, i in zip(d.input_ids, d.generated, d.message_index) if g and i == k]
            assert dtok.tok.decode(ids[:-1]) == m["content"].strip() and ids[-1] in dtok.eot
    last = d.token_mask("last")
    assert sum(last) > 0 and all(g for g, l in zip(d.generated, last) if l)
    assert not any(l for l, i in zip(last, d.message_index) if i != len(msgs) - 1)


def test_token_in_token_out_rebuilds_the_same_ids(dtok, rows):
    msgs = dialogue(rows, 40, turns=3)
    ref = dtok.encode(msgs)
    d = dtok.start(msgs[:2])
    for k in range(2, len(msgs)):
        m = msgs[k]
        if m["role"] == "assistant":
            assert dtok.prompt_ids(d) == dtok.render(msgs[:k], add_generation_prompt=True)
            sampled = [t for t, g, i in zip(ref.input_ids, ref.generated, ref.message_index) if g and i == k]
            dtok.append_generated(d, sampled, logprobs=[-0.5] * len(sampled))
        else:
            dtok.append_user(d, m["content"])
    assert d.input_ids == ref.input_ids and d.generated == ref.generated
    assert d.message_index == ref.message_index


def test_sampled_ids_are_never_retokenized(dtok):
    # a generator may sample a non-canonical split (here: one token per byte); the ids stay as sampled
    d = dtok.start([{"role": "user", "content": "What is 2+3?"}])
    text_ids = dtok.tok.encode("The answer is 5", add_special_tokens=False)
    odd = []
    for tid in text_ids:  # split every multi-character token into single-character tokens when possible
        pieces = [dtok.tok.convert_tokens_to_ids(ch) for ch in dtok.tok.convert_ids_to_tokens(tid)]
        odd += pieces if all(p is not None and p != dtok.tok.unk_token_id for p in pieces) else [tid]
    assert odd != text_ids and dtok.tok.decode(odd) == dtok.tok.decode(text_ids)
    dtok.append_generated(d, odd, logprobs=[-1.0] * len(odd))
    dtok.append_user(d, "Why?")
    gen = [t for t, g in zip(d.input_ids, d.generated) if g]
    assert gen == odd  # exactly as sampled (no end-of-turn sampled: one is added, untrained)
    assert d.input_ids[len(dtok.prompt_ids(dtok.start([{"role": "user", "content": "What is 2+3?"}]))) + len(odd)] in dtok.eot


def test_dialogue_feeds_the_packer_with_shifted_mask():
    tok = byte_tokenizer("chatml")
    dtok = DialogueTokenizer(tok)
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "why?"}, {"role": "assistant", "content": "2 and 2 make 4"}]
    d = dtok.encode(msgs)
    ids, mask = d.tensors()
    b = pack_sequences([ids, ids[:5]], token_mask=[mask, mask[:5]], backend="torch")
    # position i is trained iff token i+1 is a generated token of the same sequence
    n = ids.numel()
    assert torch.equal(b.loss_mask[:n - 1], mask[1:]) and not b.loss_mask[n - 1]
    trained_targets = b.targets[:n][b.loss_mask[:n]]
    assert tok.decode(trained_targets.tolist()) == "4<|im_end|>2 and 2 make 4<|im_end|>"


def test_errors():
    dtok = DialogueTokenizer(byte_tokenizer("llama3"))
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with 'role' and 'content'"):
        dtok.encode([{"role": "user", "content": "a"}, {"content": "b"}])
    d = dtok.start([{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match=r"append_user follows an assistant turn"):
        dtok.append_user(d, "b")
    with pytest.raises(ValueError, match=r"turns must be 'all' or 'last'"):
        d.token_mask("first")
