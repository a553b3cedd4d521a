"""CPU speed of LLM generation: time to first token and decode speed, backbone alone vs ImageBind-LLM injection.

    .venv/bin/python bench/llm.py [--threads 1] [--repeats 5] [--new-tokens 32] [--presets tiny smollm2]
                                  [--cache-dir DIR] [--out bench/results/llm.md]

Per preset, the same backbone weights run three times in one process: plain (`LlamaForCausalLM`); wrapped by
`ImageBindLLM` (LoRA on every projection, gated visual vector in every layer) with a random fused feature set once,
as a query would; and the same wrapper after `merge_adapters()` (what `build_answerer` serves: the LoRA pairs and
biases folded into the base weights). Each variant gets one warm-up generation, then `--repeats` timed ones, the
variants taking turns so that a changing load on a shared machine affects them alike; the table reports medians.
Generation uses the official settings (temperature 0.1, top-p 0.75, seeded) with EOS ignored, so every run decodes
exactly `--new-tokens` tokens from the same Alpaca prompt. One torch thread by default: per-core numbers that stay
comparable on a busy machine (the shared CI machines have 2 cores).
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parents[1]
INSTRUCTION = 'Describe what a mobile robot should do when it sees a closed door in a corridor.'


@dataclass
class Row:
    preset: str
    variant: str
    parameters: int
    prompt_tokens: int
    setup_ms: float   # set_visual_features: once per query
    ttft_ms: float
    ttft_cpu_ms: float
    tokens_per_s: float
    tokens_per_cpu_s: float


@dataclass
class Timing:
    ttft_s: float
    ttft_cpu_s: float
    tokens_per_s: float
    tokens_per_cpu_s: float


def _parameters(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _plain(backbone) -> tuple[object, float]:
    return backbone.model, 0.0


def _injected(backbone, merge: bool = False) -> tuple[object, float]:
    """Wrap the backbone with ImageBind-LLM (merged if asked) and set one random visual feature.

    Returns (model, setup seconds); the setup is the per-query visual work only, not the one-time merge.
    """
    import torch

    from mm_llm_ros.core.llm.model import ImageBindLLM

    model = ImageBindLLM(backbone.model).eval()
    if merge:
        model.merge_adapters()
    feature = torch.nn.functional.normalize(torch.randn(model.config.embed_dim), dim=0)
    start = time.perf_counter()
    model.set_visual_features(feature)
    return model, time.perf_counter() - start


def _merged(backbone) -> tuple[object, float]:
    return _injected(backbone, merge=True)


VARIANTS: dict[str, Callable] = {'backbone': _plain, 'imagebind-llm': _injected, 'imagebind-llm merged': _merged}


def _presets(cache_dir: pathlib.Path | None) -> dict[str, Callable]:
    from mm_llm_ros.core.llm.backbones import load_smollm2, tiny_random_backbone

    return {'tiny': lambda: tiny_random_backbone(seed=0),
            'smollm2': lambda: load_smollm2(cache_dir=cache_dir)}


def _timed_generation(model, tokenizer, prompt: list[int], config) -> Timing:
    """Wall-clock and CPU time (this thread's: torch computes inline with one thread) to the first and last token."""
    from mm_llm_ros.core.llm.generation import generate_stream

    start = (time.perf_counter(), time.thread_time())
    first = last = start
    count = 0
    for _ in generate_stream(model, tokenizer, prompt, config):
        last = (time.perf_counter(), time.thread_time())
        first = last if count == 0 else first
        count += 1
    return Timing(first[0] - start[0], first[1] - start[1],
                  (count - 1) / (last[0] - first[0]), (count - 1) / (last[1] - first[1]))


def _measure(preset: str, load: Callable, repeats: int, new_tokens: int) -> list[Row]:
    """Every variant of one preset, timed round-robin so that a changing load on a shared machine hits all alike."""
    from mm_llm_ros.core.llm.generation import GenerationConfig
    from mm_llm_ros.core.llm.prompt import PromptBuilder

    config = GenerationConfig(max_new_tokens=new_tokens, seed=0, stop_on_eos=False)
    backbones = {variant: load() for variant in VARIANTS}  # fresh copies: ImageBindLLM patches its backbone in place
    tokenizer = backbones['backbone'].tokenizer
    prompt = PromptBuilder().encode(tokenizer, INSTRUCTION)
    models, setups, timings = {}, {}, {}
    for variant, wrap in VARIANTS.items():
        models[variant], setups[variant] = wrap(backbones[variant])
        _timed_generation(models[variant], tokenizer, prompt, config)  # warm-up: first-call allocations
        timings[variant] = []
    for _ in range(repeats):
        for variant, model in models.items():
            timings[variant].append(_timed_generation(model, tokenizer, prompt, config))

    def median(variant: str, field: str) -> float:
        return statistics.median(getattr(timing, field) for timing in timings[variant])

    return [Row(preset, variant, _parameters(model), len(prompt), 1000 * setups[variant],
                1000 * median(variant, 'ttft_s'), 1000 * median(variant, 'ttft_cpu_s'),
                median(variant, 'tokens_per_s'), median(variant, 'tokens_per_cpu_s'))
            for variant, model in models.items()]


def _load_seconds(load: Callable) -> float:
    start = time.perf_counter()
    load()
    return time.perf_counter() - start


def _markdown(rows: list[Row], loads: dict[str, float], threads: int, repeats: int, new_tokens: int) -> str:
    import torch

    lines = [
        '# LLM generation speed (CPU)',
        '',
        f'{platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} thread(s); '
        f'median of {repeats} runs after one warm-up; {new_tokens} new tokens, temperature 0.1, top-p 0.75.',
        'TTFT = prompt prefill + first token. Wall-clock and CPU-time columns; on a loaded machine wall-clock is '
        'inflated by waiting for a core, so the overheads (ImageBind-LLM relative to the same backbone, same run) '
        'are computed from CPU time. `imagebind-llm merged` is what `build_answerer` serves (LoRA pairs and biases '
        'folded into the base weights by `ImageBindLLM.merge_adapters`); `imagebind-llm` runs them unmerged.',
        '',
        '| preset | variant | parameters | prompt tokens | visual setup (ms) | TTFT (ms) | TTFT CPU (ms) | '
        'tokens/s | tokens/CPU-s | TTFT overhead | time/token overhead |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    baselines = {row.preset: row for row in rows if row.variant == 'backbone'}
    for row in rows:
        base = baselines.get(row.preset)
        if row.variant == 'backbone' or base is None:
            ttft_overhead = speed_overhead = '-'
        else:
            ttft_overhead = f'{100 * (row.ttft_cpu_ms / base.ttft_cpu_ms - 1):+.1f}%'
            speed_overhead = f'{100 * (base.tokens_per_cpu_s / row.tokens_per_cpu_s - 1):+.1f}%'
        lines.append(f'| {row.preset} | {row.variant} | {row.parameters / 1e6:.2f}M | {row.prompt_tokens} | '
                     f'{row.setup_ms:.1f} | {row.ttft_ms:.1f} | {row.ttft_cpu_ms:.1f} | {row.tokens_per_s:.1f} | '
                     f'{row.tokens_per_cpu_s:.1f} | {ttft_overhead} | {speed_overhead} |')
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines += ['', 'Backbone load (a cached copy; the first SmolLM2 use also converts its GGUF once): '
              + ', '.join(f'{name} {seconds:.2f} s' for name, seconds in loads.items())
              + f'. Peak RSS of the benchmark process: {peak_rss_mb:.0f} MB.', '']
    return '\n'.join(lines)


def run(presets: Sequence[str], threads: int, repeats: int, new_tokens: int, cache_dir: pathlib.Path | None,
        out: pathlib.Path) -> str:
    """Benchmark, write `out` (atomically), return the Markdown."""
    import torch

    torch.set_num_threads(threads)
    loaders = _presets(cache_dir)
    loads = {}
    for preset in presets:
        loaders[preset]()  # the first SmolLM2 use converts its GGUF; time the cached path that follows
        loads[preset] = _load_seconds(loaders[preset])
    rows = [row for preset in presets for row in _measure(preset, loaders[preset], repeats, new_tokens)]
    markdown = _markdown(rows, loads, threads, repeats, new_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + '.tmp')
    tmp.write_text(markdown)
    tmp.replace(out)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--presets', nargs='+', default=['tiny', 'smollm2'], choices=['tiny', 'smollm2'])
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    parser.add_argument('--repeats', type=int, default=5, help='timed generations per variant')
    parser.add_argument('--new-tokens', type=int, default=32, help='tokens decoded per generation')
    parser.add_argument('--cache-dir', type=pathlib.Path, default=None,
                        help='backbone conversion cache (default: $XDG_CACHE_HOME/mm_llm_ros)')
    parser.add_argument('--out', type=pathlib.Path, default=REPO / 'bench' / 'results' / 'llm.md')
    args = parser.parse_args(argv)
    print(run(args.presets, args.threads, args.repeats, args.new_tokens, args.cache_dir, args.out))


if __name__ == '__main__':
    sys.path.insert(0, str(REPO / 'mm_llm_ros'))  # the source tree, like the unit tests
    main()
