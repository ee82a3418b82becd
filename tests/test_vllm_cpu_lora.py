"""The CPU LoRA ops plugin computes what vLLM's own torch ops compute, on real vLLM code and random tensors."""
from __future__ import annotations

import importlib.util
from importlib.metadata import entry_points

import pytest
import torch
import vllm.lora.ops.torch_ops.lora_ops as installed

from loop.generation import vllm_cpu_lora as fast


def _vllm_originals():
    # A fresh copy of vLLM's module: the plugin may already have patched the imported one in this process.
    spec = importlib.util.spec_from_file_location("vllm_original_lora_ops", installed.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ORIG = _vllm_originals()
CASES = {  # token -> adapter slot, as vLLM passes them (-1: the wrap-around vLLM's indexing gives)
    "one adapter": [0] * 7,
    "mixed": [0, 1, 1, 0, 2, 2, 2],
    "negative": [-1, -1, 0, 1, -1, 0, 0],
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("four_d", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_values_as_vllm(case, four_d, dtype):
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor(CASES[case])
    x = torch.randn(len(idx), 24, generator=g, dtype=dtype)
    a = torch.randn(3, 8, 24, generator=g, dtype=dtype)  # shrink: [slots, r, in]
    b = torch.randn(3, 40, 8, generator=g, dtype=dtype)  # expand: [slots, out, r]
    if four_d:
        a, b = a.unsqueeze(1), b.unsqueeze(1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)

    ys = [torch.zeros(len(idx), 8, dtype=dtype) for _ in range(2)]
    ORIG.bgmv_shrink(x, a, ys[0], idx, 0.5)
    fast.bgmv_shrink(x, a, ys[1], idx, 0.5)
    torch.testing.assert_close(ys[1], ys[0], **tol)

    h = ys[0]
    for add in (False, True):
        outs = [torch.ones(len(idx), 40, dtype=dtype) for _ in range(2)]
        ORIG.bgmv_expand(h, b, outs[0], idx, add)
        fast.bgmv_expand(h, b, outs[1], idx, add)
        torch.testing.assert_close(outs[1], outs[0], **tol)
        outs = [torch.ones(len(idx), 100, dtype=dtype) for _ in range(2)]
        ORIG.bgmv_expand_slice(h, b, outs[0], idx, 30, 40, add)
        fast.bgmv_expand_slice(h, b, outs[1], idx, 30, 40, add)
        torch.testing.assert_close(outs[1], outs[0], **tol)
        assert (outs[1][:, :30] == 1).all() and (outs[1][:, 70:] == 1).all()


def test_registered_as_a_vllm_plugin():
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("ratchet_cpu_lora") == "loop.generation.vllm_cpu_lora:register"
