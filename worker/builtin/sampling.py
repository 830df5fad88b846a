"""Turning one step's logits into tokens, and deciding when a request is done.

``sample`` runs once per engine step over the whole batch: greedy rows take an argmax, sampled rows
get temperature, top-k and top-p applied as batched tensor ops; only the final draw is per row,
because each seeded request owns its own ``torch.Generator`` (the same seed gives the same text
whatever else shares the batch). ``TextTail`` detokenises incrementally and finds stop strings in
the text, holding back the few characters that could still become a stop string while streaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from loraplane.worker.inference.sampling import SamplingParams

_F32_MAX = float(torch.finfo(torch.float32).max)


def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request generator when seeded, so its draws do not depend on the batch it sits in."""
    if params.seed is None or params.greedy:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int | None]:
    """One token per row of ``logits`` [n, vocab] (float32); None for a row that has no distribution.

    Every row is checked before anything is drawn, so a row that cannot be sampled fails alone and
    no other row's generator moves twice (issue 18: a retry after a failed batch draw did that).
    """
    out: list[int | None] = list(logits.argmax(dim=-1).tolist())
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return out
    idx = torch.tensor(sampled, device=logits.device)
    rows = logits.index_select(0, idx).float()
    # (l - max) / T: the best token stays at 0 and the rest go to -inf as T -> 0, so any positive
    # temperature samples (1e-300 is the greedy limit) instead of dividing by a float32 zero.
    # 1/T is capped at float32's largest so 0 * (1/T) is never NaN.
    scale = [min(1.0 / params[i].temperature, _F32_MAX) for i in sampled]
    rows = (rows - rows.amax(dim=-1, keepdim=True)) * torch.tensor(scale, device=rows.device).unsqueeze(1)
    top_k = [params[i].top_k for i in sampled]
    top_p = [params[i].top_p for i in sampled]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, sorted_idx = rows.sort(dim=-1, descending=True)
        vocab = rows.shape[1]
        ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=rows.device)
        ranks = torch.arange(vocab, device=rows.device).unsqueeze(0)
        drop = ranks >= ks.unsqueeze(1)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = probs.cumsum(dim=-1) - probs
        drop |= before >= torch.tensor(top_p, device=rows.device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        rows = torch.full_like(rows, float("-inf")).scatter(1, sorted_idx, sorted_logits)
    probs = rows.softmax(dim=-1)
    valid = (torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)).tolist()
    for j, i in enumerate(sampled):
        if not valid[j]:
            out[i] = None
    unseeded = [j for j, i in enumerate(sampled) if generators[i] is None and valid[j]]
    if unseeded:
        draws = torch.multinomial(probs[unseeded], 1).squeeze(1)
        for j, token in zip(unseeded, draws.tolist(), strict=True):
            out[sampled[j]] = token
    for j, i in enumerate(sampled):
        gen = generators[i]
        if gen is not None and valid[j]:
            out[i] = int(torch.multinomial(probs[j], 1, generator=gen))
    return out


@dataclass
class TextTail:
    """Incremental detokenisation plus stop-string search for one request.

    ``push(token)`` returns the newly *safe* text: text that can no longer be cut by a stop string.
    Multi-byte characters split across tokens are held until complete (the decoder yields U+FFFD).
    """

    tokenizer: Any
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` handed out already
    stopped: bool = False
    _prefix: int = 0
    _read: int = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        new_text = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if new_text.endswith("\ufffd") or len(new_text) <= len(prefix_text):
            return ""  # an incomplete character or a token with no text yet
        start = len(self.text)
        self.text += new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            longest = max(len(s) for s in self.stop)
            window = max(0, start - longest + 1)
            hits = [p for p in (self.text.find(s, window) for s in self.stop) if p >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                out, self.emitted = self.text[self.emitted :], len(self.text)
                return out
            safe = max(self.emitted, len(self.text) - longest + 1)
            out, self.emitted = self.text[self.emitted : safe], safe
            return out
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out

    def flush(self) -> str:
        """Everything not handed out yet, incomplete characters included (the request is finishing)."""
        if not self.stopped and self._read < len(self.ids):
            prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
            new_text = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
            self.text += new_text[len(prefix_text) :]
            self._prefix = self._read = len(self.ids)
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out
