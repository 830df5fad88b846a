"""The scheduler stepped by hand: chunked prefill, KV reserved by need, and one bad request failing alone.

Each test loads a real engine (tiny Llama, PEFT adapters from disk) without its thread and calls
``Scheduler.run_once`` itself, so step counts are exact and nothing depends on timing.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplane.errors import LoraplaneError, PermanentError
from loraplane.worker.builtin import tiers
from loraplane.worker.builtin.runner import AdapterWeights, ModelRunner
from loraplane.worker.builtin.sampling import generator_for
from loraplane.worker.builtin.scheduler import SchedulerSettings
from loraplane.worker.builtin.service import Engine, EngineSettings
from loraplane.worker.inference.engines import Output
from loraplane.worker.inference.sampling import SamplingParams
from loraplane.worker.registry import Registry, VersionEntry

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@dataclass
class Call:
    """One submitted request as its client sees it."""

    submitted_at: int
    tokens: list[int] = field(default_factory=list)
    first_at: int | None = None  # the step that produced its first token
    reason: str | None = None
    error: LoraplaneError | None = None


class Driver:
    """An engine whose steps the test runs one at a time."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], **settings: Any) -> None:
        sched = {k: settings.pop(k) for k in list(settings) if k in SchedulerSettings.__dataclass_fields__}
        self.registry = Registry()
        for i, (name, path) in enumerate(sorted(adapters.items())):
            self.registry.upsert(
                VersionEntry(
                    id=100 + i,
                    served_name=name,
                    adapter=f"t/{name}",
                    state="Ready",
                    local_dir=path,
                )
            )
        engine_settings = EngineSettings(max_lora_rank=16, scheduler=SchedulerSettings(**sched), **settings)
        self.engine = Engine.load(model_dir, engine_settings)
        self.step_count = 0
        self._n = 0

    def submit(self, model: str | None, prompt: list[int], params: SamplingParams = GREEDY) -> Call:
        call = Call(self.step_count)

        def on_output(out: Output) -> None:
            if out.token_ids and call.first_at is None:
                call.first_at = self.step_count
            call.tokens.extend(out.token_ids)
            if out.finish_reason is not None:
                call.reason, call.error = out.finish_reason, out.error

        self._n += 1
        self.engine.submit(
            request_id=f"r{self._n}",
            model=model or "base",
            adapter=None if model is None else self.registry.lookup(model).lora_spec(),
            prompt_ids=prompt,
            params=params,
            on_output=on_output,
        )
        return call

    def step(self) -> None:
        self.step_count += 1
        self.engine.scheduler.run_once()

    def until_done(self, calls: list[Call], max_steps: int = 400, timeout: float = 60.0) -> None:
        """Step until every call has its last output (adapters load on a thread: allow for that)."""
        deadline = time.monotonic() + timeout
        for _ in range(max_steps):
            if all(c.reason is not None for c in calls) or time.monotonic() > deadline:
                break
            if not self.engine.scheduler.running:
                time.sleep(0.005)  # only waiting for an adapter load
            self.step()
        assert all(c.reason is not None for c in calls), "requests did not finish"

    def idle(self) -> None:
        """Nothing held: every block back in the pool, no running or waiting request, no adapter in use."""
        s, kv = self.engine.scheduler, self.engine.runner.kv
        assert (s.running, s.waiting, s.queued) == ([], [], 0)
        assert kv.free_tokens == kv.total_tokens and kv.blocks == {}
        assert self.engine.tiers.running == {} and self.engine.tiers.refs == {}

    def close(self) -> None:
        self.engine.stop()


@pytest.fixture
def drivers() -> Any:
    made: list[Driver] = []

    def make(model_dir: Path, adapters: dict[str, Path], **settings: Any) -> Driver:
        made.append(Driver(model_dir, adapters, **settings))
        return made[-1]

    yield make
    for d in made:
        d.close()


def prompt(n: int, start: int = 3) -> list[int]:
    return [3 + (start + 7 * i) % 240 for i in range(n)]


def test_short_request_beside_a_long_prompt_gets_its_first_token_at_once(
    tiny_llama: Path, adapters: dict[str, Path], drivers: Any
) -> None:
    """The issue's measurement: budget 128, four requests decoding, a 150-token prompt at step 5 and a
    5-token request for another model at step 6. Without chunked prefill they started at steps 61 and 62."""
    d = drivers(tiny_llama, adapters, max_batched_tokens=128, max_num_seqs=8, max_model_len=256)
    warm = [d.submit(name, prompt(3)) for name in ("a0", "a1")]  # both adapters in their slots first
    d.until_done(warm)
    d.step_count = 0
    long_decode = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    running = [d.submit(None, prompt(4, start=10 + i), long_decode) for i in range(4)]
    for _ in range(5):
        d.step()
    long = d.submit("a0", prompt(150), GREEDY)
    d.step()
    short = d.submit("a1", prompt(5, start=40), GREEDY)
    d.step()
    assert short.first_at is not None and short.first_at - short.submitted_at <= 1, short
    assert long.first_at is not None and long.first_at - long.submitted_at <= 2, long
    assert all(len(c.tokens) == 7 for c in running)  # the decodes never paused
    d.until_done([*running, long, short])
    assert all(c.error is None for c in [*running, long, short])
    d.idle()


def test_chunked_prompt_matches_peft(
    tiny_llama: Path, adapters: dict[str, Path], peft_model: Any, drivers: Any
) -> None:
    """A prompt read in 8-token chunks across steps, beside decodes, gives PEFT's greedy tokens."""
    d = drivers(tiny_llama, adapters, max_batched_tokens=16, max_num_seqs=4, max_model_len=256)
    long = prompt(100)
    calls = [d.submit("a2", long), d.submit("a0", prompt(4, 9)), d.submit(None, long)]
    d.until_done(calls)
    for call, name, ids in zip(calls, ["a2", "a0", None], [long, prompt(4, 9), long], strict=True):
        assert call.error is None
        assert call.tokens == _peft_greedy(peft_model, name, ids, GREEDY.max_tokens), name
    assert d.step_count >= 100 // 16  # it really was read in chunks
    d.idle()


def _peft_greedy(peft_model: Any, adapter: str | None, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        if adapter is None:
            with peft_model.disable_adapter():
                return peft_model.generate(input_ids=x, **kw)[0, len(ids) :].tolist()
        peft_model.set_adapter(adapter)
        return peft_model.generate(input_ids=x, **kw)[0, len(ids) :].tolist()


def test_kv_reserved_by_need_and_requests_wait_for_it(tiny_llama: Path, drivers: Any) -> None:
    """A pool of 64 tokens: each request reserves prompt + max_tokens (one block of 16), so four run at once
    although max_model_len is 256; the rest wait and all finish with the tokens they get alone."""
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads x head_dim 16, float32 (the tiny Llama)
    d = drivers(tiny_llama, {}, max_num_seqs=8, max_model_len=256, kv_cache_bytes=64 * per_token)
    assert d.engine.runner.kv.total_tokens == 64
    calls = [d.submit(None, prompt(6, start=20 + i)) for i in range(10)]
    d.step()
    assert len(d.engine.scheduler.running) == 4 and len(d.engine.scheduler.waiting) == 6
    d.until_done(calls)
    assert all(c.error is None and len(c.tokens) == 6 for c in calls)
    d.idle()
    alone = [d.submit(None, prompt(6, start=20 + i)) for i in (0, 9)]
    d.until_done(alone)
    assert [alone[0].tokens, alone[1].tokens] == [calls[0].tokens, calls[9].tokens]
    # More than the whole pool: refused at submit, by name, with the sizes.
    with pytest.raises(PermanentError) as err:
        d.submit(None, prompt(60), SamplingParams(max_tokens=10))
    assert err.value.reason == "PromptTooLong" and "KV cache" in err.value.message


def test_kv_cache_size_follows_the_budget(tiny_llama: Path) -> None:
    runner = ModelRunner(tiny_llama, max_seqs=4, max_model_len=256, kv_cache_bytes=100 * 2 * 2 * 2 * 16 * 4)
    assert runner.kv.total_tokens == 96  # 100 tokens' bytes, whole blocks of 16
    runner = ModelRunner(tiny_llama, max_seqs=4, max_model_len=256)  # automatic: never above 4 x 256
    assert runner.kv.total_tokens == 4 * 256
    with pytest.raises(PermanentError) as err:
        ModelRunner(tiny_llama, max_seqs=4, max_model_len=256, kv_cache_bytes=1000)
    assert err.value.reason == "KVCacheTooSmall"
    with pytest.raises(PermanentError) as err:
        SchedulerSettings(max_num_seqs=64, max_batched_tokens=32)
    assert err.value.reason == "InvalidSettings" and "max_batched_tokens" in err.value.message


def _poisoned(src: Path, out: Path, value: float) -> Path:
    """A copy of an adapter whose lora_B tensors all hold ``value``."""
    shutil.copytree(src, out)
    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for key in tensors:
        if "lora_B" in key:
            tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, str(path))
    return out


def _overflowing(weights: AdapterWeights) -> AdapterWeights:
    """Weights whose forward overflows (lora_B x 1e30). The reader refuses such a file on paper
    (UnrepresentableWeights), so these engine tests scale the weights after it: they test the engine's own
    defence, for an adapter whose output overflows where validation's bound for inputs of magnitude 1
    did not see it coming."""
    scaled = {key: (a, b * 1e30) for key, (a, b) in weights.weights.items()}
    return dataclasses.replace(weights, weights=scaled)


def test_adapters_with_nan_or_overflowing_weights_fail_only_their_own_requests(
    tiny_llama: Path, adapters: dict[str, Path], tmp_path: Path, drivers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: a NaN adapter at temperature 1 beside a good adapter in the same steps made the whole step
    fail (8 of 40 good requests with it). Now its requests fail by name and the others are untouched: NaN
    weights are refused when the adapter loads (so are weights whose update overflows float32 on paper:
    UnrepresentableWeights); weights whose output overflows anyway (scaled after the reader, see
    _overflowing) reach the step, and only their rows, with NaN/Inf logits, fail."""
    bad = {
        "nan": _poisoned(adapters["a3"], tmp_path / "nan", float("nan")),
        "huge": _poisoned(adapters["a0"], tmp_path / "huge", 1.0),  # scaled on load below
    }
    load = tiers.load_adapter_weights
    monkeypatch.setattr(
        tiers,
        "load_adapter_weights",
        lambda d, *a, **k: _overflowing(load(d, *a, **k)) if Path(d).name == "huge" else load(d, *a, **k),
    )
    d = drivers(tiny_llama, {"good": adapters["a1"], **bad}, max_num_seqs=8, max_model_len=64)
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)

    def good_params(i: int) -> SamplingParams:
        return sampled if i % 2 else dataclasses.replace(GREEDY, max_tokens=8)

    def wave() -> tuple[list[Call], list[Call], list[Call]]:
        good, nan, huge = [], [], []
        for i in range(12):
            if i % 4 == 1:
                nan.append(d.submit("nan", prompt(5, start=30 + i), sampled))
            if i % 4 == 2:
                huge.append(d.submit("huge", prompt(5, start=30 + i), sampled))
            good.append(d.submit("good" if i % 2 else None, prompt(5, start=30 + i), good_params(i)))
        return good, nan, huge

    good, nan, huge = wave()
    d.until_done(good + nan + huge)
    for c in nan:  # refused on load (the shared reader) or, loaded anyway, by its logits
        assert c.error is not None and c.error.reason in ("NonFiniteWeights", "NonFiniteOutput"), c
    for c in huge:
        assert c.error is not None and c.error.reason == "NonFiniteOutput", c
        assert "NaN or Inf" in c.error.message and "'huge'" in c.error.message
    assert all(c.error is None and len(c.tokens) == 8 for c in good)
    d.idle()
    # The same good requests alone give the same tokens: nothing leaked into their rows (KV blocks reused
    # from a failed sequence are zeroed; block-table padding never reads them).
    for i, c in enumerate(good):
        again = d.submit("good" if i % 2 else None, prompt(5, start=30 + i), good_params(i))
        d.until_done([again])
        assert again.tokens == c.tokens, i
    good2, nan2, huge2 = wave()  # and the engine keeps serving every kind of request
    d.until_done(good2 + nan2 + huge2)
    assert [c.tokens for c in good2] == [c.tokens for c in good]
    assert all(c.error is not None for c in nan2 + huge2)
    d.idle()


def test_a_step_that_raises_fails_only_the_row_that_caused_it(tiny_llama: Path, drivers: Any) -> None:
    """A token outside the vocab (the API refuses it; a direct caller might not) makes the runner raise for
    the whole batch: the step is split until that row is found; the others finish as if it never came."""
    d = drivers(tiny_llama, {}, max_num_seqs=8, max_model_len=64)
    vocab = d.engine.runner.config.vocab_size
    calls = [d.submit(None, prompt(4, start=50 + i)) for i in range(7)]
    bad = d.submit(None, [5, vocab + 3, 7])
    d.until_done([*calls, bad])
    assert bad.error is not None and bad.error.reason == "TokenOutOfRange"
    assert all(c.error is None and len(c.tokens) == GREEDY.max_tokens for c in calls)
    d.idle()
    alone = d.submit(None, prompt(4, start=53))
    d.until_done([alone])
    assert alone.tokens == calls[3].tokens


def test_sampling_fields_beyond_the_engines_range(tiny_llama: Path, drivers: Any) -> None:
    """Issue 11: seed 2**70 wedged the engine. SamplingParams refuses it by name; and a request that
    reaches the scheduler with it anyway (built without the check) fails alone at admission."""
    for bad in (dict(seed=2**70), dict(seed=-(2**63) - 1), dict(top_k=2**40), dict(stop_token_ids=(-1,))):
        with pytest.raises(PermanentError) as err:
            SamplingParams(temperature=1.0, **bad)
        assert err.value.reason == "InvalidSamplingParams", bad
    assert generator_for(SamplingParams(temperature=1.0, seed=-(2**63)), torch.device("cpu")) is not None
    d = drivers(tiny_llama, {}, max_num_seqs=4, max_model_len=64)
    unchecked = SamplingParams(temperature=1.0, max_tokens=4)
    object.__setattr__(unchecked, "seed", 2**70)  # as if a caller skipped the check
    wedge = d.submit(None, prompt(4), unchecked)
    others = [d.submit(None, prompt(4, start=60 + i)) for i in range(6)]  # more than max_num_seqs
    d.until_done([wedge, *others])
    assert wedge.error is not None and wedge.error.reason == "InvalidSamplingParams"
    assert "Overflow" in wedge.error.message
    assert all(c.error is None and len(c.tokens) == GREEDY.max_tokens for c in others)
    d.idle()


def test_lora_scaling_is_kept_in_float32(tiny_llama: Path) -> None:
    """rsLoRA r=12, alpha=16: 16/sqrt(12) = 4.6188 would be 4.625 in bfloat16."""
    runner = ModelRunner(tiny_llama, dtype=torch.bfloat16, max_loras=2, max_lora_rank=16, max_seqs=2)
    fan_in, fan_out = runner.config.proj_shape("q_proj")
    scaling = 16 / math.sqrt(12)
    w = {(0, "q_proj"): (torch.ones(12, fan_in), torch.ones(fan_out, 12))}
    runner.set_slot(1, AdapterWeights(adapter_id=1, rank=12, scaling=scaling, weights=w, nbytes=0))
    assert runner.lora.scaling.dtype == torch.float32
    assert runner.lora.scaling[1].item() == pytest.approx(scaling, rel=1e-7)


def test_kv_left_by_a_non_finite_sequence_never_reaches_another(
    tiny_llama: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """A sequence with NaN K/V frees its blocks; the next owner reads masked positions of those blocks (and
    padding) beside a longer row. softmax(QK)V turns a masked NaN into NaN (0 * NaN), so blocks are zeroed
    when taken and padding reads a block that is never written."""
    from loraplane.worker.builtin.runner import SeqStep, load_adapter_weights

    runner = ModelRunner(tiny_llama, max_loras=1, max_lora_rank=16, max_seqs=4, max_model_len=64)
    runner.set_slot(0, _overflowing(load_adapter_weights(adapters["a0"], runner.config, adapter_id=1)))
    runner.allocate(0, 48)
    assert not torch.isfinite(runner.step([SeqStep(0, prompt(40), 0)])).all()
    runner.free(0)  # its three blocks, full of NaN, go back to the pool
    short, long = prompt(5, start=70), prompt(37, start=90)
    runner.allocate(1, 16)
    runner.allocate(2, 48)
    mixed = runner.step([SeqStep(1, short, -1), SeqStep(2, long, -1)])
    fresh = ModelRunner(tiny_llama, max_loras=1, max_lora_rank=16, max_seqs=4, max_model_len=64)
    fresh.allocate(1, 16)
    fresh.allocate(2, 48)
    alone = torch.cat([fresh.step([SeqStep(1, short, -1)]), fresh.step([SeqStep(2, long, -1)])])
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-4)


def test_worker_flags_size_the_engine(tiny_llama: Path) -> None:
    from loraplane.worker import settings as worker_settings

    base = ["--base-model", str(tiny_llama)]
    s = worker_settings.load(
        [*base, "--max-num-seqs", "4", "--max-batched-tokens", "64", "--kv-cache-bytes", "1Mi"], environ={}
    )
    e = s.engine.builtin(s.served_model_name)
    assert (e.scheduler.max_num_seqs, e.scheduler.max_batched_tokens, e.kv_cache_bytes) == (4, 64, 2**20)
    with pytest.raises(worker_settings.ConfigError, match="--max-batched-tokens"):
        worker_settings.load([*base, "--max-num-seqs", "64", "--max-batched-tokens", "32"], environ={})
    with pytest.raises(worker_settings.ConfigError, match="--kv-cache-bytes"):
        worker_settings.load([*base, "--kv-cache-bytes", "-1"], environ={})
