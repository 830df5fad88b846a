"""The KV cache for continuous batching: a paged pool of fixed-size blocks.

Layout per layer: K and V of shape [num_blocks, block_size, kv_heads, head_dim]. A sequence gets
its blocks at allocate(), enough for ``max_tokens`` (prompt + generation; default the model's
max length), so a step never fails half-way for lack of memory and memory follows what requests
need, not max_seqs x max_len. One step's batch is ragged: decodes (one new token) and prefills (a
prompt, or a chunk of one) mix; attention runs once for the decode rows and once for the prefill
rows, each padded only to the longest member of its own group.

The cache holds no adapter identity: blocks belong to one request, and a request runs on one
adapter ID from start to end, so no state computed with one adapter version reaches another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplane.crds.errors import PermanentError

BLOCK_SIZE = 16


@dataclass
class _Group:
    """Rows of one attention call and the index maps between the flat token batch and [rows, n_max]."""

    kv_index: torch.Tensor  # [b * kv_len] flat cache slot of every key position (pad -> 0, masked)
    token_index: torch.Tensor  # flat token index per padded query slot [b * n_max] (pad -> 0)
    flat_positions: torch.Tensor  # positions into the padded output that are real, in flat-token order
    flat_tokens: torch.Tensor  # the flat token index of each of those
    b: int
    n_max: int
    kv_len: int
    mask: torch.Tensor  # [b, 1, n_max, kv_len] bool, True = attend


class KVCache:
    """Paged K/V pool; ``begin_step`` plans one ragged step, ``attend`` runs per layer."""

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
        shape = (num_layers, self.num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seqs, self.max_len, self.blocks_per_seq = max_seqs, max_len, blocks_per_seq
        self.device = device
        self.sliding_window = sliding_window
        self.blocks: dict[int, list[int]] = {}
        self.length: dict[int, int] = {}
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._groups: list[_Group] = []
        self._write_slots = torch.empty(0, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    @property
    def free_tokens(self) -> int:
        """Tokens that sequences allocated now could still reserve."""
        return len(self._free) * self.block_size

    def capacity(self, seq_id: int) -> int:
        """Tokens this sequence may hold in total (its reservation)."""
        return len(self.blocks[seq_id]) * self.block_size

    def allocate(self, seq_id: int, max_tokens: int | None = None) -> None:
        """Reserve blocks for up to ``max_tokens`` tokens (prompt + output; default max_len)."""
        if seq_id in self.blocks:
            raise PermanentError("SequenceExists", f"sequence {seq_id} already has a KV cache; free it first")
        want = self.max_len if max_tokens is None else max_tokens
        if not 0 < want <= self.max_len:
            raise PermanentError(
                "SequenceTooLong",
                f"sequence {seq_id} asks for {want} tokens; max_model_len is {self.max_len}",
            )
        need = -(-want // self.block_size)
        if len(self.blocks) >= self.max_seqs or need > len(self._free):
            raise PermanentError(
                "KVCacheFull",
                f"the KV cache cannot hold sequence {seq_id} ({len(self.blocks)} of {self.max_seqs} sequences, "
                f"{self.free_tokens} free tokens, {need * self.block_size} needed); wait for a sequence to finish",
            )
        self.blocks[seq_id] = [self._free.pop() for _ in range(need)]
        self.length[seq_id] = 0

    def free(self, seq_id: int) -> None:
        blocks = self.blocks.pop(seq_id, None)
        self.length.pop(seq_id, None)
        if blocks is not None:
            self._free.extend(reversed(blocks))

    def begin_step(self, seq_ids: list[int], counts: list[int]) -> torch.Tensor:
        """Plan a step where sequence i adds counts[i] tokens (flat order = seq order). Returns positions."""
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
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(pasts, counts, strict=True)])
        width = max(-(-(p + n) // self.block_size) for p, n in zip(pasts, counts, strict=True))
        table = torch.tensor([(self.blocks[s] + [0] * width)[:width] for s in seq_ids])  # [seqs, width]
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
        for sid, n in zip(seq_ids, counts, strict=True):
            self.length[sid] += n
        return positions

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
