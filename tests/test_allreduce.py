"""The gradient exchange plan across N pods: every pod ends with the same bits, whatever N."""

import math

import numpy as np
import pytest

from model.allreduce import butterfly, run_plan


def _replay(pods: int, seed: int = 0):
    """Runs the plan on float32 vectors of wide dynamic range, where any two summation orders
    give different bits; returns each pod's average as component B computes it."""
    rng = np.random.default_rng(seed)
    grads = [(rng.standard_normal(4096) * 10.0 ** rng.integers(-6, 6, 4096)).astype(np.float32)
             for _ in range(pods)]
    plan = butterfly(pods)
    moves = []

    def move(tree, pod):
        moves.append(pod)
        return tree.copy()

    operands = run_plan(plan, grads, move=move, add=lambda pod, a, b: a + b)
    scale = np.float32(1.0 / (2 if pods == 1 else pods))
    return grads, [(lo + hi) * scale for lo, hi in operands], plan, moves


@pytest.mark.parametrize("pods", range(1, 10))
def test_every_pod_gets_the_same_bits_and_the_mean(pods):
    grads, averages, plan, moves = _replay(pods)
    for average in averages[1:]:
        assert average.tobytes() == averages[0].tobytes()
    # Within float32 rounding of the largest term (the terms cancel in places).
    error = np.abs(averages[0] - np.mean(grads, axis=0, dtype=np.float64))
    assert np.all(error <= 1e-6 * np.max(np.abs(grads), axis=0))
    assert len(moves) == plan.transfers


def test_summation_order_matters_for_these_numbers():
    # The replay would pass vacuously if every order gave the same bits.
    grads, _, _, _ = _replay(4)
    assert ((grads[0] + grads[1]) + (grads[2] + grads[3])).tobytes() != \
        (((grads[0] + grads[1]) + grads[2]) + grads[3]).tobytes()


@pytest.mark.parametrize("pods", [2, 4, 8, 16])
def test_powers_of_two_take_log2_rounds_of_n_transfers(pods):
    plan = butterfly(pods)
    assert len(plan.rounds) + 1 == int(math.log2(pods))  # the last round is fused into B
    assert plan.transfers == pods * int(math.log2(pods))


def test_two_pods_is_palms_exchange_and_one_pod_adds_itself():
    assert butterfly(2).rounds == () and butterfly(2).final == ((0, 1), (0, 1))
    assert butterfly(1).final == ((0, 0),) and butterfly(1).transfers == 0
    three = butterfly(3)  # pod 2 folds into pod 0, then receives both operands of B
    assert three.final == ((0, 1), (0, 1), (0, 1)) and three.transfers == 5  # 1 + 1 + 1 + 2
    with pytest.raises(ValueError):
        butterfly(0)
