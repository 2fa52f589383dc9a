"""Rewards of ExGRPO: outcome reward and the Dialogue Structure Utility bonus (paper Eq. 5-6).

For a question with Scenario-A outcome rewards a [G] (all k probes, then the question) and Scenario-B
outcome rewards b [G] (the first k' probes): P_full = mean(a), P_partial = mean(b),
r_dsu = delta if P_full > nu * P_partial else 0, added to the Scenario-A trajectories that answered
correctly. Scenario B keeps its outcome reward."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DSUResult:
    total_a: list[float]  # [G] R_total of Scenario A
    total_b: list[float]  # [G] R_total of Scenario B
    p_full: float
    p_partial: float
    bonus: float  # r_dsu (0 or delta)


def dsu_rewards(base_a, base_b, *, delta: float, nu: float, enabled: bool = True) -> DSUResult:
    if not base_a or not base_b:
        raise ValueError("dsu_rewards needs at least one trajectory in each scenario")
    p_full = sum(base_a) / len(base_a)
    p_partial = sum(base_b) / len(base_b)
    bonus = delta if enabled and p_full > nu * p_partial else 0.0
    total_a = [r + bonus if r == 1 else r for r in base_a]
    return DSUResult([float(x) for x in total_a], [float(x) for x in base_b], p_full, p_partial, bonus)
