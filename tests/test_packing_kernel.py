"""pack_sequences / unpack against the one-sequence-at-a-time reference on random ragged inputs."""
import pytest
import torch
from exgrpo_kernels import PackedBatch, pack_sequences, pack_sequences_reference, unpack

from tests.utils import BACKENDS, DEVICE


def ragged(S, seed, max_len=40, huge=None, empty_every=5):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len, (S,), generator=g)
    lens[::empty_every] = 0 if empty_every else lens[::empty_every]
    if S > 2:
        lens[1] = 1
    if huge:
        lens[S // 2] = huge
    seqs = [torch.randint(0, 50000, (int(n),), generator=g) for n in lens]
    masks = [torch.rand(int(n), generator=g) > 0.4 for n in lens]
    return seqs, masks


CASES = [(1, 0, None), (7, 1, None), (64, 2, 3000), (5000, 3, None), (33, 4, None)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S,seed,huge", CASES)
@pytest.mark.parametrize("with_mask", [True, False])
def test_pack_matches_reference(backend, S, seed, huge, with_mask):
    seqs, masks = ragged(S, seed, huge=huge, max_len=12 if S >= 5000 else 40)
    if all(x.numel() == 0 for x in seqs):
        seqs[0] = torch.tensor([5])
        masks[0] = torch.tensor([True])
    ref = pack_sequences_reference(seqs, masks if with_mask else None)
    b = pack_sequences([x.to(DEVICE) for x in seqs], token_mask=[m.to(DEVICE) for m in masks] if with_mask else None,
                       backend=backend)
    assert isinstance(b, PackedBatch)
    for k in ("input_ids", "position_ids", "targets", "seq_ids", "loss_mask", "cu_seqlens"):
        got = getattr(b, k).cpu()
        assert got.dtype == ref[k].dtype, k
        assert torch.equal(got, ref[k]), k
    assert b.max_seqlen == max(x.numel() for x in seqs)
    # the same through the flat-buffer form
    flat = pack_sequences(torch.cat(seqs).to(DEVICE), torch.tensor([x.numel() for x in seqs]).to(DEVICE),
                          token_mask=torch.cat(masks).to(DEVICE) if with_mask else None, backend=backend)
    assert torch.equal(flat.targets.cpu(), ref["targets"]) and torch.equal(flat.loss_mask.cpu(), ref["loss_mask"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_round_trip(backend):
    seqs, _ = ragged(23, 9)
    b = pack_sequences([x.to(DEVICE) for x in seqs], backend=backend)
    vals = torch.randn(b.num_tokens, 3, device=DEVICE)
    padded = unpack(vals, b, padding_value=float("nan"))
    assert padded.shape == (23, b.max_seqlen, 3)
    off = 0
    for s, x in enumerate(seqs):
        n = x.numel()
        assert torch.equal(padded[s, :n], vals[off:off + n])
        assert torch.isnan(padded[s, n:]).all()
        off += n
    lst = unpack(vals[:, 0], b, as_list=True)
    assert [t.numel() for t in lst] == [x.numel() for x in seqs]
    assert torch.equal(torch.cat(lst), vals[:, 0])


def test_targets_never_cross_a_border_and_positions_restart():
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])]
    b = pack_sequences(seqs, token_mask=[torch.tensor([0, 1, 1]), torch.tensor([1]), torch.tensor([0, 1])])
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert b.position_ids.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.targets.tolist() == [2, 3, -100, -100, 6, -100]
    assert b.loss_mask.tolist() == [True, True, False, False, True, False]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.seq_ids.tolist() == [0, 0, 0, 1, 2, 2]


def test_bad_input():
    with pytest.raises(ValueError, match=r"lengths sum to 5 but the flat buffer has 4 tokens"):
        pack_sequences(torch.arange(4), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match=r"lengths\[1\] = -1 is negative"):
        pack_sequences(torch.arange(4), torch.tensor([5, -1]))
    with pytest.raises(ValueError, match=r"sequences\[1\] must be a 1-D tensor"):
        pack_sequences([torch.arange(3), torch.zeros(2, 2)])
    with pytest.raises(ValueError, match=r"sequences is empty"):
        pack_sequences([])
    with pytest.raises(ValueError, match=r"token_mask\[0\] has shape \(2,\) but sequences\[0\] has \(3,\)"):
        pack_sequences([torch.arange(3)], token_mask=[torch.ones(2)])
    b = pack_sequences([torch.arange(3)])
    with pytest.raises(ValueError, match=r"values must have first dimension N = 3"):
        unpack(torch.zeros(4), b)
