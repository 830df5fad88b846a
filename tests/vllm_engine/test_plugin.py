"""The vLLM general plugin that keeps base-model rows base in mixed batches (worker/vllm/plugin.py).

vLLM's CPU LoRA ops gather ``weights[indices]`` and vLLM marks "no adapter" with index -1, which
torch reads as the last slot. These tests run the ops themselves, before and after the fix; the
end-to-end check (a mixed batch through the running worker) is in test_worker.py.
"""

from __future__ import annotations

import importlib.metadata

import torch


def _ops() -> tuple[object, object]:
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    return lora_ops, punica_cpu


def test_registered_as_a_vllm_general_plugin() -> None:
    names = {ep.value for ep in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert "loraplane.worker.vllm.plugin:register" in names, names


def test_rows_without_an_adapter_are_left_alone() -> None:
    from loraplane.worker.vllm import plugin

    lora_ops, punica_cpu = _ops()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=gen)
    a = torch.randn(2, 1, 3, 8, generator=gen)  # 2 slots, rank 3
    b = torch.randn(2, 1, 8, 3, generator=gen)
    rows = torch.tensor([-1, 0, -1, 1])  # base, slot 0, base, slot 1

    def apply(shrink, expand) -> torch.Tensor:
        y = torch.zeros(4, 8)
        buf = torch.zeros(4, 3)
        shrink(x, a, buf, rows, 0.5)
        expand(buf, b, y, rows, True)
        return y

    plugin.register()
    got = apply(lora_ops.bgmv_shrink, lora_ops.bgmv_expand)
    assert punica_cpu.bgmv_shrink is lora_ops.bgmv_shrink, "the CPU punica wrapper's binding is replaced"
    want = torch.zeros(4, 8)
    for i, slot in enumerate(rows.tolist()):
        if slot >= 0:
            want[i] = (x[i] @ a[slot, 0].T * 0.5) @ b[slot, 0].T
    torch.testing.assert_close(got, want)
    assert got[0].abs().sum() == 0 and got[2].abs().sum() == 0, "base rows get no adapter"

    # The SGMV path (vLLM V1's only path on CPU) goes through the same ops.
    y = torch.zeros(4, 8)
    buf = torch.zeros(4, 3)
    seg = torch.unique_consecutive(rows, return_counts=True)
    lora_ops.sgmv_shrink(x, a, buf, None, seg[1], seg[0], len(seg[0]), 1, 4, 0.5)
    lora_ops.sgmv_expand(buf, b, y, None, seg[1], seg[0], len(seg[0]), 1, 4, True)
    torch.testing.assert_close(y, want)


def test_probe_sees_the_bug_in_the_unpatched_op() -> None:
    from loraplane.worker.vllm import plugin

    lora_ops, _ = _ops()
    plugin.register()
    original = lora_ops.bgmv_shrink.__wrapped__  # functools.wraps keeps the op vLLM shipped
    assert plugin._mishandles_negative_index(original), "vLLM fixed the op: the plugin stays off there"
    assert not plugin._mishandles_negative_index(lora_ops.bgmv_shrink)


def test_non_finite_keys_and_values_never_reach_the_kv_cache() -> None:
    """vLLM's CPU attention reads a block's positions beyond the sequence (masked by weight, and 0 x NaN
    is NaN): a NaN written by one request would reach every later owner of the block. The plugin's
    do_kv_cache_update writes non-finite keys and values as 0; finite ones unchanged."""
    from types import SimpleNamespace

    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from loraplane.worker.vllm import plugin

    plugin.register()
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = "decoder", "auto"
    layer = SimpleNamespace(isa="vec", _k_scale_float=1.0, _v_scale_float=1.0)
    blocks, heads, block_size, head_dim = 2, 1, 32, 32
    cache = torch.full((blocks, heads, block_size, 2 * head_dim), 7.0)
    key = torch.randn(3, heads, head_dim)
    value = torch.randn(3, heads, head_dim)
    key[1, 0, 5], value[2, 0, 0], value[0, 0, 1] = float("nan"), float("inf"), -float("inf")
    impl.do_kv_cache_update(layer, key, value, cache, torch.tensor([0, 1, 2]))
    assert torch.isfinite(cache).all(), "no NaN / Inf in the cache"
    assert (cache == 0).sum() == 3, "exactly the three non-finite values are written as 0"
    assert (cache == 7.0).sum() == cache.numel() - 3 * 2 * head_dim, "only the three slots are written"
