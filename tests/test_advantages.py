import pytest
import torch
from exgrpo_kernels import grouped_advantages, grouped_advantages_reference


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", range(4))
def test_matches_float64_reference_on_unsorted_groups(scale, seed):
    g = torch.Generator().manual_seed(seed)
    S = 53
    group_ids = torch.randint(0, 9, (S,), generator=g) * 7 - 20  # unsorted, non-contiguous, negative ids
    rewards = torch.randint(0, 3, (S,), generator=g).float() + 0.5 * torch.rand(S, generator=g)
    rewards[group_ids == group_ids[0]] = 1.0  # one constant group
    ours = grouped_advantages(rewards, group_ids, scale=scale)
    ref = grouped_advantages_reference(rewards, group_ids, scale=scale)
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.all(ours[group_ids == group_ids[0]] == 0)


def test_known_values_and_degenerate_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.3, 0.3, 5.0], dtype=torch.float64)
    groups = torch.tensor([4, 4, 4, 0, 2, 2, 9])
    adv = grouped_advantages(rewards, groups)
    # group 4: mean 2/3, Bessel std sqrt(1/3)
    std = (1 / 3) ** 0.5
    expected = torch.tensor([(1 / 3) / (std + 1e-4), (-2 / 3) / (std + 1e-4), (1 / 3) / (std + 1e-4), 0, 0, 0, 0],
                            dtype=torch.float64)
    assert adv.dtype == torch.float64 and torch.allclose(adv, expected, atol=1e-12)
    # equal rewards whose mean is not exactly representable still give exactly 0
    adv2 = grouped_advantages(torch.full((3,), 0.1), torch.zeros(3, dtype=torch.int64))
    assert torch.all(adv2 == 0) and not torch.isnan(adv2).any()
    one = grouped_advantages(torch.tensor([3.0]), torch.tensor([0]))
    assert torch.all(one == 0)


@pytest.mark.parametrize("bad,match", [
    (lambda r, g: (r[:, None], g), "rewards must be a 1-D"),
    (lambda r, g: (r[:0], g[:0]), "rewards is empty"),
    (lambda r, g: (r, g[:-1]), "group_ids must have shape"),
    (lambda r, g: (r, g.float()), "group_ids must be an integer"),
    (lambda r, g: (r.long(), g), "rewards must be a float"),
    (lambda r, g: (torch.where(g == 1, float("nan"), r), g), r"rewards\[\d+\] = nan"),
])
def test_bad_input_is_a_clear_error(bad, match):
    r, g = torch.rand(6), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=match):
        grouped_advantages(*bad(r, g))
    with pytest.raises(ValueError, match="scale must be one of"):
        grouped_advantages(r, g, scale="rank")
