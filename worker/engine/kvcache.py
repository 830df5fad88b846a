"""The KV cache for continuous batching: a preallocated pool of per-sequence rows.

Layout per layer: K and V of shape [max_seqs, max_len, kv_heads, head_dim]. A sequence owns one
row from allocate() to free(); its length grows each step. One step's batch is ragged: decodes
(one new token) and prefills (a whole prompt) mix; attention runs once for the decode rows and
once for the prefill rows, each padded only to the longest member of its own group.

The cache holds no adapter identity: a row belongs to one request, and a request runs on one
adapter ID from start to end, so no state computed with one adapter version reaches another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraplane.crds.errors import PermanentError


@dataclass
class _Group:
    """Rows of one attention call and the index maps between the flat token batch and [rows, n_max]."""

    rows: torch.Tensor  # cache rows [b]
    token_index: torch.Tensor  # flat token index per padded query slot [b * n_max] (pad -> 0)
    valid: torch.Tensor  # [b * n_max] bool: which padded slots are real tokens
    flat_positions: torch.Tensor  # positions into the padded output that are real, in flat-token order
    flat_tokens: torch.Tensor  # the flat token index of each of those
    n_max: int
    kv_len: int
    mask: torch.Tensor  # [b, 1, n_max, kv_len] bool, True = attend


class KVCache:
    """Preallocated K/V pool; ``begin_step`` plans one ragged step, ``attend`` runs per layer."""

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
    ) -> None:
        shape = (num_layers, max_seqs, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seqs, self.max_len = max_seqs, max_len
        self.device = device
        self.sliding_window = sliding_window
        self.row_of: dict[int, int] = {}
        self.length: dict[int, int] = {}
        self._free = list(range(max_seqs - 1, -1, -1))
        self._groups: list[_Group] = []
        self._write_rows = torch.empty(0, dtype=torch.long)
        self._write_pos = torch.empty(0, dtype=torch.long)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def allocate(self, seq_id: int) -> None:
        if seq_id in self.row_of:
            raise PermanentError(
                "SequenceExists", f"sequence {seq_id} already has a KV cache row; free it first"
            )
        if not self._free:
            raise PermanentError(
                "KVCacheFull",
                f"all {self.max_seqs} KV cache rows are in use; free a sequence or raise max_seqs",
            )
        self.row_of[seq_id] = self._free.pop()
        self.length[seq_id] = 0

    def free(self, seq_id: int) -> None:
        row = self.row_of.pop(seq_id, None)
        self.length.pop(seq_id, None)
        if row is not None:
            self._free.append(row)

    def begin_step(self, seq_ids: list[int], counts: list[int]) -> torch.Tensor:
        """Plan a step where sequence i adds counts[i] tokens (flat order = seq order). Returns positions."""
        pasts = []
        for sid, n in zip(seq_ids, counts, strict=True):
            if sid not in self.row_of:
                raise PermanentError(
                    "SequenceUnknown", f"sequence {sid} has no KV cache row; call allocate() first"
                )
            if n < 1:
                raise PermanentError("EmptyStep", f"sequence {sid} has no tokens in this step")
            past = self.length[sid]
            if past + n > self.max_len:
                raise PermanentError(
                    "SequenceTooLong",
                    f"sequence {sid} would reach {past + n} tokens, above max_model_len {self.max_len}",
                )
            pasts.append(past)
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(pasts, counts, strict=True)])
        rows = [self.row_of[s] for s in seq_ids]
        self._write_rows = torch.repeat_interleave(torch.tensor(rows), torch.tensor(counts)).to(self.device)
        self._write_pos = positions.to(self.device)
        # Decodes and prefills attend in separate calls so neither pads to the other's length.
        self._groups = []
        for members in (
            [i for i, n in enumerate(counts) if n == 1],
            [i for i, n in enumerate(counts) if n > 1],
        ):
            if members:
                self._groups.append(self._plan_group(members, rows, pasts, counts, starts))
        for sid, n in zip(seq_ids, counts, strict=True):
            self.length[sid] += n
        return positions

    def _plan_group(
        self, members: list[int], rows: list[int], pasts: list[int], counts: list[int], starts: list[int]
    ) -> _Group:
        n_max = max(counts[i] for i in members)
        kv_len = max(pasts[i] + counts[i] for i in members)
        g_counts = torch.tensor([counts[i] for i in members])
        g_pasts = torch.tensor([pasts[i] for i in members])
        g_starts = torch.tensor([starts[i] for i in members])
        slot = torch.arange(n_max)
        valid = slot[None, :] < g_counts[:, None]  # [b, n_max]
        token_index = torch.where(valid, g_starts[:, None] + slot[None, :], torch.zeros(()).long())
        q_pos = g_pasts[:, None] + slot[None, :]  # [b, n_max]
        k_pos = torch.arange(kv_len)
        mask = k_pos[None, None, :] <= q_pos[:, :, None]
        if self.sliding_window is not None:
            mask &= (q_pos[:, :, None] - k_pos[None, None, :]) < self.sliding_window
        mask |= ~valid[:, :, None] & (k_pos == 0)[None, None, :]  # padded queries attend somewhere (no NaN)
        flat_valid = valid.reshape(-1)
        pos_in_pad = torch.nonzero(flat_valid).squeeze(1)
        return _Group(
            rows=torch.tensor([rows[i] for i in members], device=self.device),
            token_index=token_index.reshape(-1).to(self.device),
            valid=flat_valid.to(self.device),
            flat_positions=pos_in_pad.to(self.device),
            flat_tokens=token_index.reshape(-1)[pos_in_pad].to(self.device),
            n_max=n_max,
            kv_len=kv_len,
            mask=mask[:, None].to(self.device),
        )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this step's k/v [tokens, kv_heads, d] and return attention output [tokens, heads, d]."""
        self.k[layer].index_put_((self._write_rows, self._write_pos), k)
        self.v[layer].index_put_((self._write_rows, self._write_pos), v)
        out = torch.empty_like(q)
        heads, d = q.shape[1], q.shape[2]
        for g in self._groups:  # at most two: decodes and prefills
            b = g.rows.shape[0]
            qg = q.index_select(0, g.token_index).view(b, g.n_max, heads, d).transpose(1, 2)
            kg = self.k[layer, :, : g.kv_len].index_select(0, g.rows).transpose(1, 2)
            vg = self.v[layer, :, : g.kv_len].index_select(0, g.rows).transpose(1, 2)
            og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, enable_gqa=True)
            og = og.transpose(1, 2).reshape(b * g.n_max, heads, d)
            out.index_copy_(0, g.flat_tokens, og.index_select(0, g.flat_positions))
        return out
