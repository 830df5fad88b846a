"""Stacked LoRA slot buffers and the batched delta for a batch that mixes adapters.

The forward's linears (model.LINEARS) each concatenate one to three projections that share their
input: qkv (q/k/v), o, gate_up (gate/up), down. Per linear, the A matrices of its projections sit in
one buffer [layers, max_loras, max_rank, projections, in], rank-major, so that a batch of active rank
r reads the leading [:r] rows of every projection as one contiguous [r * projections, in] block per
slot: one shrink matmul per linear (4 a layer, not 7). Each projection's B is stored transposed,
[layers, max_loras, max_rank, out], for the same reason (PEFT's layout is [out, r]). An adapter of
rank < max_rank, or without some projection, is zero-padded: its zero rows add exactly nothing.

A step's batch gives one slot per row (-1 = base model). ``LoraSlots.plan`` turns that into a
``LoraBatch`` once per step; the forward calls ``LoraBatch.add_delta`` after each linear:

* SEGMENTED (the SGMV idea): tokens are grouped by slot into a padded [groups, longest, in]
  tensor and each group multiplies its own adapter in one bmm; when the slots in the batch form
  a (nearly) contiguous range the weights are a view of the buffer, never copied.
* GATHERED (the BGMV idea): one row per token with that token's adapter; used when nearly every
  token has its own adapter (decode with all-distinct adapters), where grouping buys nothing.

Both use only the batch's active rank, skip the projections no adapter in the batch targets, and
never loop over adapters in Python.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from loraplane.errors import PermanentError

from .model import LINEARS, ModelConfig

#: a segmented span may include up to this fraction of slots that no row uses (read but idle).
SPAN_SLACK = 0.25
#: SEGMENTED cuts segments into chunks when padding would exceed this multiple of the tokens.
PAD_LIMIT = 2
#: choose GATHERED when distinct slots >= this fraction of adapted tokens.
GATHER_THRESHOLD = 0.9


class LoraSlots:
    """The device-resident slots; set_slot / clear_slot copy weights in and out."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_loras: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.config, self.max_loras, self.max_rank = config, max_loras, max_rank
        self.device, self.dtype = device, dtype
        layers = config.num_layers
        self.a: dict[str, torch.Tensor] = {}  # per linear: [layers, max_loras, max_rank, projections, in]
        self.bt: dict[str, torch.Tensor] = {}  # per projection: [layers, max_loras, max_rank, out]
        #: projection -> (its linear, its index there, its first and last+1 output column there)
        self.place: dict[str, tuple[str, int, int, int]] = {}
        for linear, projs in LINEARS.items():
            fan_in = config.proj_shape(projs[0])[0]
            self.a[linear] = torch.zeros(
                layers, max_loras, max_rank, len(projs), fan_in, dtype=dtype, device=device
            )
            col = 0
            for k, proj in enumerate(projs):
                fan_out = config.proj_shape(proj)[1]
                self.bt[proj] = torch.zeros(layers, max_loras, max_rank, fan_out, dtype=dtype, device=device)
                self.place[proj] = (linear, k, col, col + fan_out)
                col += fan_out
        # fp32 whatever the weights' dtype: in bf16 rsLoRA's 16/sqrt(12) = 4.6188 would become 4.625
        self.scaling = torch.zeros(max_loras, dtype=torch.float32, device=device)
        self.ranks = [0] * max_loras
        self.targets: list[frozenset[str]] = [frozenset()] * max_loras

    @property
    def bytes_per_slot(self) -> int:
        return sum(
            (t.numel() // self.max_loras) * t.element_size() for t in (*self.a.values(), *self.bt.values())
        )

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise PermanentError(
                "SlotOutOfRange", f"slot {slot} is outside 0..{self.max_loras - 1} (max_loras)"
            )

    def set_slot(
        self,
        slot: int,
        *,
        rank: int,
        scaling: float,
        weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Copy one adapter's (A [r, in], B [out, r]) per (layer, proj) into ``slot``; zero the rest."""
        self._check_slot(slot)
        if not 0 < rank <= self.max_rank:
            raise PermanentError(
                "RankTooLarge",
                f"adapter rank {rank} exceeds max_lora_rank {self.max_rank}; raise maxLoraRank",
            )
        problems = []
        for (layer, proj), (a, b) in weights.items():
            if proj not in self.place or not 0 <= layer < self.config.num_layers:
                problems.append(f"({layer}, {proj}) is not a target linear of this model")
                continue
            fan_in, fan_out = self.config.proj_shape(proj)
            r = a.shape[0]
            if a.shape != (r, fan_in) or b.shape != (fan_out, r) or r > self.max_rank:
                problems.append(
                    f"layer {layer} {proj}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                    f"[r<= {self.max_rank}, {fan_in}] / [{fan_out}, r]"
                )
        if problems:
            raise PermanentError("AdapterShapeMismatch", "; ".join(problems))
        self.clear_slot(slot)
        for (layer, proj), (a, b) in weights.items():
            r = a.shape[0]
            linear, k = self.place[proj][:2]
            self.a[linear][layer, slot, :r, k].copy_(a)
            self.bt[proj][layer, slot, :r].copy_(b.t())
        self.scaling[slot] = scaling
        self.ranks[slot] = rank
        self.targets[slot] = frozenset(proj for _, proj in weights)

    def clear_slot(self, slot: int) -> None:
        self._check_slot(slot)
        for buf in (*self.a.values(), *self.bt.values()):
            buf[:, slot].zero_()
        self.scaling[slot] = 0.0
        self.ranks[slot] = 0
        self.targets[slot] = frozenset()

    def plan(self, row_slots: list[int], row_counts: list[int], *, mode: str = "auto") -> LoraBatch | None:
        """How to apply LoRA for a step: row i has row_counts[i] consecutive tokens on slot row_slots[i].

        mode: "auto" (choose per batch), "segmented" or "gathered" (forced, for tests and benchmarks).
        Returns None when no row uses an adapter.
        """
        for s in row_slots:
            if s != -1:
                self._check_slot(s)
        adapted = [i for i, s in enumerate(row_slots) if s >= 0 and self.ranks[s] > 0]
        if not adapted:
            return None
        distinct = sorted({row_slots[i] for i in adapted})
        rank = max(self.ranks[s] for s in distinct)
        projs = frozenset().union(*(self.targets[s] for s in distinct))
        starts = [0]
        for n in row_counts:
            starts.append(starts[-1] + n)
        total = starts[-1]
        n_adapted = sum(row_counts[i] for i in adapted)
        if mode == "auto":
            mode = "gathered" if len(distinct) >= GATHER_THRESHOLD * n_adapted else "segmented"
        batch = LoraBatch(self, rank=rank, projs=projs, total_tokens=total)
        if mode == "gathered":
            batch.plan_gathered(adapted, row_slots, row_counts, starts)
        elif mode == "segmented":
            batch.plan_segmented(adapted, distinct, row_slots, row_counts, starts)
        else:
            raise ValueError(f"unknown LoRA mode {mode!r}")
        return batch


@dataclass
class LoraBatch:
    """One step's LoRA plan; ``add_delta`` is the hot path, called per (layer, linear)."""

    slots: LoraSlots
    rank: int
    projs: frozenset[str]
    total_tokens: int
    mode: str = ""
    groups: int = 0
    longest: int = 0
    span: tuple[int, int] | None = None  # slot range [lo, hi) whose weights are a view
    slot_index: torch.Tensor | None = None  # slots to gather when not a span
    src: torch.Tensor | None = None  # flat token index of each adapted token
    dest: torch.Tensor | None = None  # its place in the padded [groups * longest]
    # when the adapted tokens are the flat tokens [first, first + n) in order (the runner sorts rows
    # by slot, base rows first): their rows are read and written as a slice, never gathered or scattered
    first: int | None = None
    # when moreover the padded layout is those rows themselves (equal segments): just views
    offset: int | None = None
    scale: torch.Tensor | None = None  # [groups, 1, 1]
    _pad: dict[int, torch.Tensor] = field(default_factory=dict)

    def _weights(self, buf: torch.Tensor) -> torch.Tensor:
        """[groups, r, ...] for one layer's buffer [max_loras, max_rank, ...]."""
        if self.span is not None:
            return buf[self.span[0] : self.span[1], : self.rank]
        return buf[:, : self.rank].index_select(0, self.slot_index)  # type: ignore[arg-type]

    def _set_slots(self, slot_list: list[int]) -> None:
        dev = self.slots.device
        lo = slot_list[0]
        if slot_list == list(range(lo, lo + len(slot_list))):
            self.span = (lo, lo + len(slot_list))
        else:
            self.slot_index = torch.tensor(slot_list, device=dev)
        self.scale = self.slots.scaling[torch.tensor(slot_list, device=dev)].view(-1, 1, 1)

    def plan_gathered(
        self, adapted: list[int], row_slots: list[int], row_counts: list[int], starts: list[int]
    ) -> None:
        self.mode = "gathered"
        tok_slots: list[int] = []
        src: list[int] = []
        for i in adapted:
            tok_slots.extend([row_slots[i]] * row_counts[i])
            src.extend(range(starts[i], starts[i + 1]))
        self.groups, self.longest = len(src), 1
        self._set_slots(tok_slots)
        self.first = self.offset = src[0] if src == list(range(src[0], src[0] + len(src))) else None
        self.src = torch.tensor(src, device=self.slots.device)

    def plan_segmented(
        self,
        adapted: list[int],
        distinct: list[int],
        row_slots: list[int],
        row_counts: list[int],
        starts: list[int],
    ) -> None:
        self.mode = "segmented"
        tokens_of: dict[int, list[int]] = {s: [] for s in distinct}
        for i in adapted:
            tokens_of[row_slots[i]].extend(range(starts[i], starts[i + 1]))
        n_adapted = sum(len(ts) for ts in tokens_of.values())
        lo, hi = distinct[0], distinct[-1] + 1
        longest = max(len(ts) for ts in tokens_of.values())
        chunks: list[tuple[int, list[int]]]
        if len(distinct) * longest > PAD_LIMIT * n_adapted:
            # Very unequal segments (a prefill among decodes): cut them into chunks of the average
            # segment length, so padding stays below the tokens themselves; weights are gathered.
            size = -(-n_adapted // len(distinct))
            chunks = [(s, ts[k : k + size]) for s, ts in tokens_of.items() for k in range(0, len(ts), size)]
        elif (hi - lo) - len(distinct) <= SPAN_SLACK * len(distinct):
            # A nearly contiguous slot range is read as a view; idle slots in it are zero-row groups.
            chunks = [(s, tokens_of.get(s, [])) for s in range(lo, hi)]
        else:
            chunks = list(tokens_of.items())
        group_slots = [s for s, _ in chunks]
        self.groups, self.longest = len(chunks), max(len(ts) for _, ts in chunks)
        src = [t for _, ts in chunks for t in ts]
        dest = [g * self.longest + k for g, (_, ts) in enumerate(chunks) for k in range(len(ts))]
        self._set_slots(group_slots)
        n = len(src)
        self.first = src[0] if src == list(range(src[0], src[0] + n)) else None
        unpadded = dest == list(range(n)) and self.groups * self.longest == n
        self.offset = self.first if unpadded else None
        dev = self.slots.device
        self.src = torch.tensor(src, device=dev)
        self.dest = torch.tensor(dest, device=dev)

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """x [tokens, in] -> [groups, longest, in] (zero rows where a group is shorter)."""
        if self.offset is not None:
            return x[self.offset : self.offset + self.groups * self.longest].view(
                self.groups, self.longest, -1
            )
        if self.mode == "gathered":
            return x.index_select(0, self.src).unsqueeze(1)  # type: ignore[arg-type]
        buf = self._pad.get(x.shape[1])
        if buf is None:
            buf = x.new_zeros(self.groups * self.longest, x.shape[1])
            self._pad[x.shape[1]] = buf
        assert self.src is not None
        n = len(self.src)
        rows = x[self.first : self.first + n] if self.first is not None else x.index_select(0, self.src)
        buf.index_copy_(0, self.dest, rows)  # type: ignore[arg-type]
        return buf.view(self.groups, self.longest, x.shape[1])

    def add_delta(self, layer: int, linear: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[tokens, out] += scaling * (x @ A^T) @ B^T for each token's slot, for every projection of
        ``linear`` some adapter in the batch targets (y: that linear's output, its projections side by side)."""
        active = [p for p in LINEARS[linear] if p in self.projs]
        if not active:
            return
        xs = self._padded(x)
        g, n, r = self.groups, self.longest, self.rank
        buf = self.slots.a[linear][layer]  # [max_loras, max_rank, projections, in]
        parts = buf.shape[2]
        if len(active) == parts:  # one shrink for all of them; h's columns are (rank, projection)
            a = self._weights(buf)
            h = torch.bmm(xs, a.flatten(1, 2).transpose(1, 2)).view(g, n, r, parts).transpose(2, 3)
            hs = torch.empty(g, n, parts, r, dtype=h.dtype, device=h.device)
            torch.mul(h, self.scale.view(g, 1, 1, 1), out=hs)  # type: ignore[union-attr]
            shrunk = {p: hs[:, :, k] for k, p in enumerate(LINEARS[linear])}
        else:  # only some: one shrink each, on strided views of the same buffer
            shrunk = {}
            for p in active:
                a = self._weights(buf[:, :, self.slots.place[p][1]])
                h = torch.bmm(xs, a.transpose(1, 2))
                shrunk[p] = h.mul_(self.scale)
        for p in active:
            self._expand(self._weights(self.slots.bt[p][layer]), shrunk[p], y, *self.slots.place[p][2:])

    def _expand(self, bt: torch.Tensor, h: torch.Tensor, y: torch.Tensor, lo: int, hi: int) -> None:
        """y[:, lo:hi] += h @ bt, h [groups, longest, r] in the padded layout."""
        if self.offset is not None:  # the padded layout is y's rows [offset, offset + n) in order
            n = self.groups * self.longest
            rows = y[self.offset : self.offset + n, lo:hi]
            if rows.is_contiguous():  # accumulate straight into y: no temporary, no extra pass
                rows.view(self.groups, self.longest, -1).baddbmm_(h, bt)
            elif self.groups == 1:  # one adapter (e.g. a long prompt): one GEMM into the slice
                rows.addmm_(h[0], bt[0])
            else:  # a column slice: torch's bmm would loop over groups; one bmm and one add instead
                rows.add_(torch.bmm(h, bt).view(n, -1))
            return
        out = torch.bmm(h, bt)  # [groups, longest, out]
        flat = out.view(-1, out.shape[-1])
        if self.mode != "gathered":
            flat = flat.index_select(0, self.dest)  # type: ignore[arg-type]
        if self.first is not None:  # a slice and an add: far cheaper than index_add_'s scatter on CPU
            y[self.first : self.first + len(flat), lo:hi].add_(flat)
        else:
            y[:, lo:hi].index_add_(0, self.src, flat)  # type: ignore[arg-type]
