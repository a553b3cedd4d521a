"""ImageBind-huge on a GPU: latency, batched throughput and the physical limit, as one Markdown section.

Imported by `bench/gpu.py` (no rclpy, no ROS): `imagebind_section(device, dtype, smoke)` returns the section and
`imagebind_results(...)` also the headline numbers for the goals. Standalone (CPU smoke run, ~10 s):

    .venv/bin/python bench/imagebind_gpu.py --device cpu --dtype float32 --smoke

The model is the official `ImageBindModel` (imagebind-unofficial) with random weights (its own initialisation,
seeded), built directly on the device: the weights' values do not matter for speed. It is measured four ways on
the same instance: `eager` (the official model as published), `fast` (`core/imagebind/inference.py` with every step
on, as on CUDA: batch-first vision trunk for torch's fused MHA kernel, channels-last stems), `fast + CUDA graphs`
(the same replayed by `GraphedForward`, as the encoder nodes run on CUDA) and `compiled` (the fast setup plus
`torch.compile` of every block; only when asked), with the cosine of their embeddings against eager's.

Physical limit: FLOPs per vision image (`torch.utils.flop_counter.FlopCounterMode` on the official forward) and the
throughput of a large matmul in the same dtype measured in the same run give limit images/s = throughput / FLOPs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO / 'mm_llm_ros') not in sys.path:
    sys.path.insert(0, str(REPO / 'mm_llm_ros'))

import torch  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from mm_llm_ros.core.imagebind import official  # noqa: E402
from mm_llm_ros.core.imagebind.inference import GraphedForward, prepare_for_inference  # noqa: E402
from mm_llm_ros.core.imagebind.model import PRESETS  # noqa: E402


@dataclass(frozen=True)
class Plan:
    preset: str
    batches: tuple[int, ...]
    latency_repeats: int      # batch-1 latency: median of this many after `warmup` calls
    throughput_repeats: int
    warmup: int
    matmul_n: int             # n x n x n product for the throughput ceiling
    compile: bool


FULL = Plan('huge', (8, 32, 128), latency_repeats=30, throughput_repeats=10, warmup=3, matmul_n=8192, compile=True)
SMOKE = Plan('tiny', (2, 4, 8), latency_repeats=20, throughput_repeats=5, warmup=2, matmul_n=1024, compile=False)
MATMUL_REPEATS = 10


@dataclass
class Variant:
    name: str
    vision_ms: float = float('nan')
    audio_ms: float = float('nan')
    depth_ms: float = float('nan')
    stem_ms: float = float('nan')      # vision patch conv + tokens alone, largest batch (channels-last or not)
    images_per_s: dict[int, float] = field(default_factory=dict)
    peak_gib: float = float('nan')
    min_cosine: float = float('nan')   # vision embeddings vs eager's, over the largest batch
    setup_s: float = 0.0               # prepare_for_inference, incl. compiling on its warm-up inputs
    first_calls_s: float = 0.0         # first call at each new shape (recompiles when compiled)
    note: str = ''


# --- timing ----------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Median milliseconds of `repeats` calls after `warmup` untimed ones (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == 'cuda':
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - started))
    return statistics.median(times)


def timed_s(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


# --- model and inputs ------------------------------------------------------------------------------------------------


def build_random(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The official model with its own (seeded) random initialisation, constructed directly on `device`."""
    kwargs = {**official.model_defaults(), **PRESETS[preset]}
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []), torch.device(device):
        torch.manual_seed(seed)
        model = official.model_class()(**kwargs)
    return model.to(dtype).eval().requires_grad_(False)


def make_inputs(batch: int, device: torch.device, dtype: torch.dtype, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random preprocessed inputs: vision (B, 3, 224, 224), audio (B, 3 clips, 1, 128, 204), depth (B, 1, 224, 224)."""
    gen = torch.Generator(device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    return {'vision': randn(batch, 3, 224, 224), 'audio': randn(batch, 3, 1, 128, 204),
            'depth': randn(batch, 1, 224, 224)}


def vision_flops(model: torch.nn.Module, image: torch.Tensor) -> int:
    """FLOPs of the official forward for one image: matmuls, convs and attention, as FlopCounterMode counts them.

    Attention runs through SDPA's math backend here (bmm, which FlopCounterMode counts on every device; it has no
    formula for the CPU flash kernel), so the count is the same on CPU and GPU.
    """
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel([SDPBackend.MATH]), counter:
        model({'vision': image})
    return counter.get_total_flops()


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Throughput of an n x n x n product in `dtype` (median of MATMUL_REPEATS)."""
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    ms = median_ms(lambda: torch.mm(a, b), device, MATMUL_REPEATS, warmup=3)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


# --- measurement -----------------------------------------------------------------------------------------------------


def measure(model: torch.nn.Module, variant: Variant, inputs: Mapping[int, dict[str, torch.Tensor]],
            reference: torch.Tensor | None, device: torch.device, plan: Plan,
            run_model: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """Fill `variant` in; returns its vision embeddings of the largest batch (float32) for the cosine check.
    `run_model` (default: `model` itself) is what is timed, e.g. a `GraphedForward` of `model`."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    run_model = model if run_model is None else run_model

    def forward(batch: dict[str, torch.Tensor]) -> Callable[[], object]:
        def call():
            with torch.inference_mode():
                return run_model(batch)
        return call

    one = inputs[1]
    calls = {m: forward({m: one[m]}) for m in ('vision', 'audio', 'depth')}
    calls.update({b: forward({'vision': inputs[b]['vision']}) for b in plan.batches})
    variant.first_calls_s = sum(timed_s(call, device) for call in calls.values())
    variant.vision_ms = median_ms(calls['vision'], device, plan.latency_repeats, plan.warmup)
    variant.audio_ms = median_ms(calls['audio'], device, plan.latency_repeats, plan.warmup)
    variant.depth_ms = median_ms(calls['depth'], device, plan.latency_repeats, plan.warmup)
    for b in plan.batches:
        ms = median_ms(calls[b], device, plan.throughput_repeats, plan.warmup)
        variant.images_per_s[b] = b / (ms * 1e-3)
    stem, images = model.modality_preprocessors['vision'], inputs[plan.batches[-1]]['vision']
    with torch.inference_mode():
        variant.stem_ms = median_ms(lambda: stem(vision=images), device, plan.throughput_repeats, plan.warmup)
    if device.type == 'cuda':
        variant.peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30
    largest = calls[plan.batches[-1]]()['vision'].float()
    if reference is not None:
        variant.min_cosine = torch.nn.functional.cosine_similarity(largest, reference, dim=-1).min().item()
    return largest


@dataclass
class Results:
    device: str
    dtype: str
    plan: Plan
    variants: list[Variant]
    build_s: float
    flops_per_image: int
    matmul_tflops: float

    @property
    def limit_images_per_s(self) -> float:
        return self.matmul_tflops * 1e12 / self.flops_per_image

    def best(self) -> tuple[float, float]:
        """Best vision batch-1 latency (ms) and best batched throughput (images/s) over the variants."""
        measured = [v for v in self.variants if v.images_per_s]
        return (min(v.vision_ms for v in measured),
                max(ips for v in measured for ips in v.images_per_s.values()))


def run(device: torch.device, dtype: torch.dtype, smoke: bool, compile: bool | None = None) -> Results:
    plan = SMOKE if smoke else FULL
    if compile is not None:
        plan = dataclasses.replace(plan, compile=compile)
    build_s = time.perf_counter()
    model = build_random(plan.preset, device, dtype)
    _sync(device)
    build_s = time.perf_counter() - build_s
    inputs = {b: make_inputs(b, device, dtype, seed=b) for b in (1, *plan.batches)}
    flops = vision_flops(model, inputs[1]['vision'])
    tflops = matmul_tflops(device, dtype, plan.matmul_n)

    eager = Variant('eager (official)')
    reference = measure(model, eager, inputs, None, device, plan)
    eager.min_cosine = 1.0
    variants = [eager]

    fast = Variant('fast setup')
    fast.setup_s = timed_s(lambda: prepare_for_inference(model, batch_first=True, channels_last=True), device)
    measure(model, fast, inputs, reference, device, plan)
    variants.append(fast)

    graphed = Variant('fast + CUDA graphs')
    if device.type == 'cuda':
        runner = GraphedForward(model)
        measure(model, graphed, inputs, reference, device, plan, runner)
        # A second input of the same shape must give its own embeddings: the static buffers are refilled.
        other = make_inputs(1, device, dtype, seed=99)['vision']
        with torch.inference_mode():
            cos = torch.nn.functional.cosine_similarity(runner({'vision': other})['vision'].float(),
                                                        model({'vision': other})['vision'].float(), dim=-1)
        graphed.min_cosine = min(graphed.min_cosine, cos.min().item())
        graphed.note = f'{runner.captures} graphs captured' + (f'; fell back: {runner.failure}' if runner.failure else '')
        del runner
    else:
        graphed.note = 'CUDA only'
    variants.append(graphed)

    compiled = Variant('fast + torch.compile')
    if plan.compile:
        warmup = {m: inputs[1][m] for m in ('vision', 'audio', 'depth')}
        setup = None

        def compile_model():
            nonlocal setup
            setup = prepare_for_inference(model, batch_first=True, channels_last=True, compile=True,
                                          warmup=warmup)

        compiled.setup_s = timed_s(compile_model, device)
        if setup.compiled:
            measure(model, compiled, inputs, reference, device, plan)
        else:
            compiled.note = setup.notes[-1]
    else:
        compiled.note = 'skipped in smoke mode' if smoke else 'not asked for (compile=False)'
    variants.append(compiled)
    del model, inputs
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return Results(str(device), str(dtype).removeprefix('torch.'), plan, variants, build_s, flops, tflops)


# --- report ----------------------------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 2) -> str:
    return '-' if value != value else f'{value:,.{digits}f}'


def render(r: Results) -> str:
    p = r.plan
    name = f'ImageBind-{p.preset} {r.dtype} (random weights)'
    where = r.device if not r.device.startswith('cuda') else f'{r.device} ({torch.cuda.get_device_name(r.device)})'
    header = '| | ' + ' | '.join(v.name for v in r.variants) + ' |'
    timer = 'CUDA events' if r.device.startswith('cuda') else 'wall clock'
    lines = [f'## {name} on {where}', '',
             f'One model instance (built on the device in {r.build_s:.1f} s) measured eager, then prepared in place. '
             f'Latency: median of {p.latency_repeats} calls after {p.warmup} warm-up calls; throughput: median of '
             f'{p.throughput_repeats} forwards per batch size; {timer}. '
             'Audio = one input of 3 clips of 2 s (the node\'s window); cosine = lowest over the batch of '
             f'{p.batches[-1]} vision embeddings against eager\'s.', '',
             header, '|---|' + '---:|' * len(r.variants)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f'| {label} | ' + ' | '.join(values) + ' |')

    def cells(get: Callable[[Variant], float], digits: int = 2) -> list[str]:
        return [_fmt(get(v), digits) if v.images_per_s else '-' for v in r.variants]

    row('vision batch 1 (ms)', cells(lambda v: v.vision_ms))
    for b in p.batches:
        row(f'vision batch {b} (images/s)', cells(lambda v, b=b: v.images_per_s.get(b, float('nan')), 0))
    row('audio batch 1, 3 clips (ms)', cells(lambda v: v.audio_ms))
    row('depth batch 1 (ms)', cells(lambda v: v.depth_ms))
    row(f'vision stem alone, batch {p.batches[-1]} (ms)', cells(lambda v: v.stem_ms))
    row('peak GPU memory (GiB)', cells(lambda v: v.peak_gib))
    row('min cosine vs eager', cells(lambda v: v.min_cosine, 5))
    row('setup / compile (s)', ['-' if v is r.variants[0] or not (v.images_per_s or v.setup_s) else _fmt(v.setup_s, 1)
                                for v in r.variants])
    row('first call per shape, summed (s)', cells(lambda v: v.first_calls_s, 1))
    notes = [f'{v.name}: {v.note}' for v in r.variants if v.note]
    if notes:
        lines += ['', 'Notes: ' + '; '.join(notes) + '.']

    best_ms, best_ips = r.best()
    lines += ['', f'Physical limit ({r.dtype}): FLOPs counted by `FlopCounterMode` on the official vision forward, '
              f'matmul throughput of a {p.matmul_n}x{p.matmul_n}x{p.matmul_n} product (median of {MATMUL_REPEATS}) '
              'in this run.', '',
              '| FLOPs per vision image | matmul throughput | limit | best measured (batched) | measured / limit |',
              '|---:|---:|---:|---:|---:|',
              f'| {r.flops_per_image / 1e9:,.3g} GFLOP | {r.matmul_tflops:,.3g} TFLOP/s | '
              f'{r.limit_images_per_s:,.0f} images/s | {best_ips:,.0f} images/s | '
              f'{best_ips / r.limit_images_per_s:.2f} |',
              '', f'Best vision batch-1 latency: {best_ms:.2f} ms.']
    return '\n'.join(lines)


def imagebind_results(device: torch.device, dtype: torch.dtype, smoke: bool,
                      compile: bool | None = None) -> tuple[str, dict[str, float]]:
    """The Markdown section and the headline numbers: vision_batch1_ms (best variant) and vision_images_per_s
    (best variant and batch size). `compile` overrides the plan's (full: on, smoke: off)."""
    results = run(torch.device(device), dtype, smoke, compile)
    best_ms, best_ips = results.best()
    return render(results), {'vision_batch1_ms': best_ms, 'vision_images_per_s': best_ips,
                             'vision_limit_images_per_s': results.limit_images_per_s}


def imagebind_section(device: torch.device, dtype: torch.dtype, smoke: bool) -> str:
    """The Markdown section: ImageBind-huge (`smoke`: tiny) latency, throughput and physical limit on `device`."""
    return imagebind_results(device, dtype, smoke)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--dtype', default='float16', choices=('float16', 'bfloat16', 'float32'))
    parser.add_argument('--smoke', action='store_true', help='tiny preset, small batches, no compile')
    args = parser.parse_args(argv)
    if args.device == 'cpu':
        torch.set_num_threads(1)  # steadier on the shared 2-core machines
    started = time.perf_counter()
    print(imagebind_section(torch.device(args.device), getattr(torch, args.dtype), args.smoke))
    print(f'\n({time.perf_counter() - started:.1f} s)')
    return 0


if __name__ == '__main__':
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
