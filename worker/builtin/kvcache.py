"""The KV cache for continuous batching: a paged pool of fixed-size blocks.

Layout per layer: K and V of shape [num_blocks + 1, block_size, kv_heads, head_dim]. A sequence
*reserves* at allocate() what it can use (prompt + max_tokens, never max_model_len by default) and
takes blocks from the pool as it grows, one block at a time; the reservation guarantees a step never
fails half-way for lack of a block, and blocks a sequence never reaches (it stopped early) were
never taken. One step's batch is ragged: decodes (one new token) and prefills (a prompt, or a chunk
of one) mix; attention runs once for the decode rows and once for the prefill rows, each padded
only to the longest member of its own group.

Rows never see each other's values: a block is zeroed when a sequence takes it, and block-table
padding points at one extra block that is never written, so masked key positions always hold finite
numbers (a NaN there would still poison softmax(QK)V through 0 * NaN). A sequence whose adapter
produces NaN fails alone.

The cache holds no adapter identity: blocks belong to one request, and a request runs on one
adapter ID from start to end, so no state computed with one adapter version reaches another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplane.errors import PermanentError

BLOCK_SIZE = 16
#: on a GPU with no explicit budget, the KV pool takes the free memory but this fraction of the total,
#: left for activations and the allocator's fragmentation (vLLM's gpu_memory_utilization=0.9).
GPU_HEADROOM = 0.10
#: on CPU with no explicit budget, the pool takes at most this fraction of available memory.
CPU_SHARE = 0.25


def bytes_per_token(*, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token over all layers."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def pool_tokens(
    *, budget_bytes: int, per_token: int, max_seqs: int, max_len: int, device: torch.device
) -> int:
    """Tokens the KV pool holds: ``budget_bytes`` when > 0, else what the device has room for.

    Never more than max_seqs x max_len (more could not be used). On CUDA the automatic budget is the
    free memory now (weights and adapter slots are loaded already) less GPU_HEADROOM of the total; on
    CPU it is CPU_SHARE of the available memory.
    """
    most = max_seqs * max_len
    if budget_bytes > 0:
        tokens = budget_bytes // per_token
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        tokens = max(0, free - int(GPU_HEADROOM * total)) // per_token
    else:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):  # not on this OS (macOS): no automatic bound
            available = int(most * per_token / CPU_SHARE)
        tokens = int(CPU_SHARE * available) // per_token
    tokens = min(tokens, most) // BLOCK_SIZE * BLOCK_SIZE  # whole blocks, within the budget
    if tokens < BLOCK_SIZE:
        raise PermanentError(
            "KVCacheTooSmall",
            f"the KV cache budget holds {tokens} tokens ({per_token} bytes each), less than one block of "
            f"{BLOCK_SIZE}; raise --kv-cache-bytes or free device memory",
        )
    return tokens


@dataclass
class _Group:
    """Rows of one attention call and the index maps between the flat token batch and [rows, n_max]."""

    kv_index: torch.Tensor  # [b * kv_len] flat cache slot of every key position (pad -> the null block)
    token_index: torch.Tensor  # flat token index per padded query slot [b * n_max] (pad -> 0)
    flat_positions: torch.Tensor  # positions into the padded output that are real, in flat-token order
    flat_tokens: torch.Tensor  # the flat token index of each of those
    b: int
    n_max: int
    kv_len: int
    mask: torch.Tensor  # [b, 1, n_max, kv_len] bool, True = attend


class KVCache:
    """Paged K/V pool; ``begin_step`` plans one ragged step, ``attend`` runs per layer, ``end_step`` commits."""

    def __init__(
        self,
        *,
        num_layers: int,
        max_seqs: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        sliding_window: int | None = None,
        max_tokens: int | None = None,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        """max_tokens: the pool's capacity in tokens over all sequences (default max_seqs x max_len)."""
        self.block_size = block_size
        blocks_per_seq = -(-max_len // block_size)
        self.num_blocks = -(-max_tokens // block_size) if max_tokens else max_seqs * blocks_per_seq
        self.null_block = self.num_blocks  # the padding target: never written, always zero
        shape = (num_layers, self.num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seqs, self.max_len, self.blocks_per_seq = max_seqs, max_len, blocks_per_seq
        self.device = device
        self.sliding_window = sliding_window
        self.blocks: dict[int, list[int]] = {}  # blocks taken so far, in order
        self.reserved: dict[int, int] = {}  # blocks each sequence may take in total
        self.length: dict[int, int] = {}  # tokens committed (written by a step that finished)
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._promised = 0  # reserved blocks not taken yet, over all sequences
        self._groups: list[_Group] = []
        self._write_slots = torch.empty(0, dtype=torch.long)
        self._step: list[tuple[int, int]] = []

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def total_tokens(self) -> int:
        """The pool's capacity in tokens (one sequence can never reserve more)."""
        return self.num_blocks * self.block_size

    @property
    def free_tokens(self) -> int:
        """Tokens that sequences allocated now could still reserve."""
        return (len(self._free) - self._promised) * self.block_size

    def capacity(self, seq_id: int) -> int:
        """Tokens this sequence may hold in total (its reservation)."""
        return self.reserved[seq_id] * self.block_size

    def can_allocate(self, tokens: int) -> bool:
        """Whether allocate(…, tokens) would succeed now."""
        return (
            len(self.blocks) < self.max_seqs
            and -(-tokens // self.block_size) <= len(self._free) - self._promised
        )

    def allocate(self, seq_id: int, max_tokens: int | None = None) -> None:
        """Reserve room for up to ``max_tokens`` tokens (prompt + output; default max_len); blocks come later."""
        if seq_id in self.blocks:
            raise PermanentError("SequenceExists", f"sequence {seq_id} already has a KV cache; free it first")
        want = self.max_len if max_tokens is None else max_tokens
        if not 0 < want <= self.max_len:
            raise PermanentError(
                "SequenceTooLong",
                f"sequence {seq_id} asks for {want} tokens; max_model_len is {self.max_len}",
            )
        need = -(-want // self.block_size)
        if not self.can_allocate(want):
            raise PermanentError(
                "KVCacheFull",
                f"the KV cache cannot hold sequence {seq_id} ({len(self.blocks)} of {self.max_seqs} sequences, "
                f"{self.free_tokens} free tokens, {need * self.block_size} needed); wait for a sequence to finish",
            )
        self.blocks[seq_id] = []
        self.reserved[seq_id] = need
        self._promised += need
        self.length[seq_id] = 0

    def free(self, seq_id: int) -> None:
        blocks = self.blocks.pop(seq_id, None)
        self.length.pop(seq_id, None)
        if blocks is not None:
            self._promised -= self.reserved.pop(seq_id) - len(blocks)
            self._free.extend(reversed(blocks))

    def _grow(self, seq_id: int, tokens: int) -> list[int]:
        """Take blocks until the sequence can hold ``tokens``; returns the new blocks."""
        blocks = self.blocks[seq_id]
        new = [self._free.pop() for _ in range(-(-tokens // self.block_size) - len(blocks))]
        blocks.extend(new)
        self._promised -= len(new)
        return new

    def begin_step(self, seq_ids: list[int], counts: list[int]) -> torch.Tensor:
        """Plan a step where sequence i adds counts[i] tokens (flat order = seq order). Returns positions.

        Lengths move only at ``end_step``: a step that fails leaves every sequence as it was.
        """
        pasts = []
        for sid, n in zip(seq_ids, counts, strict=True):
            if sid not in self.blocks:
                raise PermanentError(
                    "SequenceUnknown", f"sequence {sid} has no KV cache; call allocate() first"
                )
            if n < 1:
                raise PermanentError("EmptyStep", f"sequence {sid} has no tokens in this step")
            past = self.length[sid]
            if past + n > self.capacity(sid):
                raise PermanentError(
                    "SequenceTooLong",
                    f"sequence {sid} would reach {past + n} tokens, above its reservation of {self.capacity(sid)} "
                    f"(max_model_len {self.max_len})",
                )
            pasts.append(past)
        new = [b for sid, p, n in zip(seq_ids, pasts, counts, strict=True) for b in self._grow(sid, p + n)]
        if new:  # stale values of an earlier owner (maybe NaN) must not reach masked positions
            idx = torch.tensor(new, device=self.device)
            self.k.index_fill_(1, idx, 0)
            self.v.index_fill_(1, idx, 0)
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(pasts, counts, strict=True)])
        width = max(-(-(p + n) // self.block_size) for p, n in zip(pasts, counts, strict=True))
        table = torch.tensor([(self.blocks[s] + [self.null_block] * width)[:width] for s in seq_ids])
        seq_of_token = torch.repeat_interleave(torch.arange(len(seq_ids)), torch.tensor(counts))
        bs = self.block_size
        self._write_slots = (table[seq_of_token, positions // bs] * bs + positions % bs).to(self.device)
        # Decodes and prefills attend in separate calls so neither pads to the other's length.
        self._groups = []
        for members in (
            [i for i, n in enumerate(counts) if n == 1],
            [i for i, n in enumerate(counts) if n > 1],
        ):
            if members:
                self._groups.append(self._plan_group(members, table, pasts, counts, starts))
        self._step = list(zip(seq_ids, counts, strict=True))
        return positions

    def end_step(self) -> None:
        """The step's forward finished: its tokens are now part of each sequence."""
        for sid, n in self._step:
            if sid in self.length:
                self.length[sid] += n
        self._step = []

    def _plan_group(
        self, members: list[int], table: torch.Tensor, pasts: list[int], counts: list[int], starts: list[int]
    ) -> _Group:
        n_max = max(counts[i] for i in members)
        kv_len = max(pasts[i] + counts[i] for i in members)
        idx = torch.tensor(members)
        g_counts, g_pasts, g_starts = (torch.tensor([v[i] for i in members]) for v in (counts, pasts, starts))
        slot = torch.arange(n_max)
        valid = slot[None, :] < g_counts[:, None]  # [b, n_max]
        token_index = torch.where(valid, g_starts[:, None] + slot[None, :], torch.zeros((), dtype=torch.long))
        q_pos = g_pasts[:, None] + slot[None, :]  # [b, n_max]
        k_pos = torch.arange(kv_len)
        kv_index = table[idx][:, k_pos // self.block_size] * self.block_size + k_pos % self.block_size
        mask = k_pos[None, None, :] <= q_pos[:, :, None]
        if self.sliding_window is not None:
            mask &= (q_pos[:, :, None] - k_pos[None, None, :]) < self.sliding_window
        mask |= ~valid[:, :, None] & (k_pos == 0)[None, None, :]  # padded queries attend somewhere (no NaN)
        pos_in_pad = torch.nonzero(valid.reshape(-1)).squeeze(1)
        return _Group(
            kv_index=kv_index.reshape(-1).to(self.device),
            token_index=token_index.reshape(-1).to(self.device),
            flat_positions=pos_in_pad.to(self.device),
            flat_tokens=token_index.reshape(-1)[pos_in_pad].to(self.device),
            b=len(members),
            n_max=n_max,
            kv_len=kv_len,
            mask=mask[:, None].to(self.device),
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k/v [tokens, kv_heads, d] and return attention output [tokens, heads, d]."""
        kf = self.k[layer].view(-1, *self.k.shape[3:])  # [blocks * block_size, kv_heads, d]
        vf = self.v[layer].view(-1, *self.v.shape[3:])
        kf.index_copy_(0, self._write_slots, k)
        vf.index_copy_(0, self._write_slots, v)
        out = torch.empty_like(q)
        heads, d = q.shape[1], q.shape[2]
        for g in self._groups:  # at most two: decodes and prefills
            qg = q.index_select(0, g.token_index).view(g.b, g.n_max, heads, d).transpose(1, 2)
            kg = kf.index_select(0, g.kv_index).view(g.b, g.kv_len, -1, d).transpose(1, 2)
            vg = vf.index_select(0, g.kv_index).view(g.b, g.kv_len, -1, d).transpose(1, 2)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, enable_gqa=True)
            og = og.transpose(1, 2).reshape(g.b * g.n_max, heads, d)
            out.index_copy_(0, g.flat_tokens, og.index_select(0, g.flat_positions))
        return out
