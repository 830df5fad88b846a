"""The interface the scheduler drives: load the base model, fill LoRA slots, run one ragged step.

``ModelRunner.step`` takes a list of ``SeqStep`` (prefills and decodes mixed, each on its own
adapter slot or the base model) and returns the logits of each sequence's last position. The
scheduler owns everything above: which requests run, which adapter sits in which slot, sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplane.errors import PermanentError
from loraplane.worker.inference.peft import PeftCheckpoint

from .kvcache import KVCache, bytes_per_token, pool_tokens
from .lora import LoraBatch, LoraSlots
from .model import CausalLM, ModelConfig, read_safetensors

DEFAULT_MAX_MODEL_LEN = 4096


@dataclass
class AdapterWeights:
    """One adapter on CPU, validated already; ``scaling`` is per slot (per-module ratios are folded into B)."""

    adapter_id: int
    rank: int
    scaling: float
    weights: dict[
        tuple[int, str], tuple[torch.Tensor, torch.Tensor]
    ]  # (layer, proj) -> (A [r,in], B [out,r])
    nbytes: int


@dataclass
class SeqStep:
    seq_id: int
    token_ids: list[int]  # prompt tokens on the first step (prefill), else the one new token
    slot: int  # device slot of its adapter, -1 for the base model


def load_adapter_weights(
    adapter_dir: Path, config: ModelConfig, *, adapter_id: int, max_lora_rank: int | None = None
) -> AdapterWeights:
    """Read a PEFT LoRA adapter into CPU tensors through validation's reader (adapter.PeftCheckpoint), so
    a direct load refuses exactly what validation refuses, with the same reasons and messages.

    Raises:
        PermanentError / ValidationFailed: as ``validate.validate_adapter`` (RankTooLarge only when
            ``max_lora_rank`` is given; ``set_slot`` checks the slots' rank anyway).
    """
    adapter = PeftCheckpoint.read(Path(adapter_dir))
    adapter.check(config, max_lora_rank=max_lora_rank)
    tensors = dict(read_safetensors(adapter.weights))
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    nbytes = 0
    for m in adapter.modules:
        a, b = tensors[m.a.name].float(), tensors[m.b.name].float()
        module_scaling = adapter.scale(m.rank, m.alpha)
        if module_scaling != adapter.scaling:  # per-module rank / alpha: folded into B, one scaling per slot
            b = b * (module_scaling / adapter.scaling)
        weights[(m.layer, m.proj)] = (a.contiguous(), b.contiguous())
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    return AdapterWeights(
        adapter_id=adapter_id, rank=adapter.rank, scaling=adapter.scaling, weights=weights, nbytes=nbytes
    )


class ModelRunner:
    """Base model + LoRA slots + KV cache; ``step`` runs one continuous-batching iteration."""

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        max_loras: int = 8,
        max_lora_rank: int = 16,
        max_seqs: int = 64,
        max_model_len: int | None = None,
        kv_cache_tokens: int | None = None,
        kv_cache_bytes: int = 0,
    ) -> None:
        """KV pool: kv_cache_tokens tokens if given, else kv_cache_bytes of memory (0: sized from the
        device's free memory, see kvcache.pool_tokens)."""
        from transformers import AutoTokenizer  # heavy import, only where a runner is built

        dev = torch.device(device)
        dtype = dtype or (torch.float32 if dev.type == "cpu" else torch.bfloat16)
        model = CausalLM.load(Path(model_dir), device=dev, dtype=dtype)
        self._build(model, max_loras, max_lora_rank, max_seqs, max_model_len, kv_cache_tokens, kv_cache_bytes)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    @classmethod
    def from_model(
        cls,
        model: CausalLM,
        *,
        tokenizer: Any = None,
        max_loras: int = 8,
        max_lora_rank: int = 16,
        max_seqs: int = 64,
        max_model_len: int | None = None,
        kv_cache_tokens: int | None = None,
        kv_cache_bytes: int = 0,
    ) -> ModelRunner:
        """A runner around weights already in memory (benchmarks with random weights)."""
        runner = cls.__new__(cls)
        runner._build(
            model, max_loras, max_lora_rank, max_seqs, max_model_len, kv_cache_tokens, kv_cache_bytes
        )
        runner.tokenizer = tokenizer
        return runner

    def _build(
        self,
        model: CausalLM,
        max_loras: int,
        max_lora_rank: int,
        max_seqs: int,
        max_model_len: int | None,
        kv_cache_tokens: int | None,
        kv_cache_bytes: int = 0,
    ) -> None:
        self.model = model
        self.device, self.dtype = model.device, model.dtype
        dtype = model.dtype
        self.config: ModelConfig = model.config
        self.max_model_len = max_model_len or min(self.config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        self.lora = LoraSlots(
            self.config, max_loras=max_loras, max_rank=max_lora_rank, device=self.device, dtype=dtype
        )
        # Sized last, so that an automatic budget sees the weights and slots already in memory.
        if kv_cache_tokens is None:
            c = self.config
            kv_cache_tokens = pool_tokens(
                budget_bytes=kv_cache_bytes,
                per_token=bytes_per_token(
                    num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, dtype=dtype
                ),
                max_seqs=max_seqs,
                max_len=self.max_model_len,
                device=self.device,
            )
        self.kv = KVCache(
            num_layers=self.config.num_layers,
            # the rows, and as many preempted sequences keeping their KV (parked, see scheduler.py)
            max_seqs=2 * max_seqs,
            max_len=self.max_model_len,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            dtype=dtype,
            device=self.device,
            sliding_window=self.config.sliding_window,
            max_tokens=kv_cache_tokens,
        )
        self.slot_adapter: list[int | None] = [None] * max_loras
        #: "auto", "segmented" or "gathered"; tests and benchmarks force one path.
        self.lora_mode = "auto"
        #: the path the last step used ("" when no row had an adapter).
        self.last_lora_mode = ""

    @property
    def max_loras(self) -> int:
        return self.lora.max_loras

    @property
    def bytes_per_slot(self) -> int:
        return self.lora.bytes_per_slot

    def set_slot(self, slot: int, weights: AdapterWeights) -> None:
        self.lora.set_slot(slot, rank=weights.rank, scaling=weights.scaling, weights=weights.weights)
        self.slot_adapter[slot] = weights.adapter_id

    def clear_slot(self, slot: int) -> None:
        self.lora.clear_slot(slot)
        self.slot_adapter[slot] = None

    def allocate(self, seq_id: int, max_tokens: int | None = None) -> None:
        """Reserve KV cache for a sequence of up to max_tokens (prompt + output; default max_model_len).

        Raises KVCacheFull (retry when a sequence finishes) or SequenceTooLong (above max_model_len).
        """
        self.kv.allocate(seq_id, max_tokens)

    @property
    def kv_free_tokens(self) -> int:
        """KV cache tokens not reserved by any sequence (admission control)."""
        return self.kv.free_tokens

    def free(self, seq_id: int) -> None:
        self.kv.free(seq_id)

    def seq_len(self, seq_id: int) -> int:
        """Tokens already in the KV cache for this sequence."""
        return self.kv.length[seq_id]

    def step(self, batch: list[SeqStep]) -> torch.Tensor:
        """Logits [len(batch), vocab] (float32) at each sequence's last new token, in batch order."""
        if not batch:
            return torch.empty(0, self.config.vocab_size)
        if len({s.seq_id for s in batch}) != len(batch):
            raise PermanentError("DuplicateSequence", "a step lists the same seq_id twice")
        for s in batch:
            if s.slot != -1 and (not 0 <= s.slot < self.max_loras or self.slot_adapter[s.slot] is None):
                raise PermanentError(
                    "SlotEmpty", f"sequence {s.seq_id} uses slot {s.slot}, which holds no adapter"
                )
            bad = [t for t in s.token_ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise PermanentError(
                    "TokenOutOfRange", f"sequence {s.seq_id} has token ids {bad[:5]} outside the vocab"
                )
        # Rows sharing an adapter sit next to each other, so segments are contiguous (often no gather at all).
        order = sorted(range(len(batch)), key=lambda i: batch[i].slot)
        rows = [batch[i] for i in order]
        counts = [len(s.token_ids) for s in rows]
        positions = self.kv.begin_step([s.seq_id for s in rows], counts)
        lens = [self.kv.length[s.seq_id] + n for s, n in zip(rows, counts, strict=True)]
        dev = self.device
        tokens = torch.tensor([t for s in rows for t in s.token_ids], device=dev)
        seq_lens = torch.repeat_interleave(torch.tensor(lens), torch.tensor(counts)).to(dev)
        ends = torch.cumsum(torch.tensor(counts), 0) - 1
        plan: LoraBatch | None = self.lora.plan([s.slot for s in rows], counts, mode=self.lora_mode)
        self.last_lora_mode = plan.mode if plan is not None else ""
        with torch.inference_mode():
            logits = self.model.forward(tokens, positions.to(dev), seq_lens, ends.to(dev), plan, self.kv)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        out = logits.index_select(0, inverse.to(dev))
        self.kv.end_step()  # last: a step that raised leaves every sequence's length as it was
        return out
