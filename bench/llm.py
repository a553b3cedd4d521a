"""Speed of LLM generation: time to first token and decode speed, backbone alone vs ImageBind-LLM injection.

    .venv/bin/python bench/llm.py [--threads 1] [--repeats 9] [--new-tokens 64] [--presets tiny smollm2]
                                  [--device cpu] [--dtype auto] [--cache-dir DIR] [--out bench/results/llm.md]
    # on a GPU: a LLaMA-7B-shaped random model in fp16 (about 60 GB of GPU memory for the four copies)
    python bench/llm.py --device cuda --presets llama7b-shape --out bench/results/llm-cuda.md

Per preset, the same backbone weights run four times in one process: plain (`LlamaForCausalLM`); plain with the
five biases per layer that ImageBind-LLM tunes (the floor for any implementation of the published model); wrapped by
`ImageBindLLM` (LoRA on every projection, gated visual vector in every layer) with a random fused feature set once,
as a query would; and the same wrapper after `merge_adapters()` (what `build_answerer` serves: the LoRA pairs and
biases folded into the base weights). Each variant gets one warm-up generation, then `--repeats` timed ones, the
variants taking turns so that a changing load on a shared machine affects them alike; the table reports medians.
Generation uses the official settings (temperature 0.1, top-p 0.75, seeded) with EOS ignored, so every run decodes
exactly `--new-tokens` tokens from the same Alpaca prompt. One torch thread by default: per-core numbers that stay
comparable on a busy machine (the shared CI machines have 2 cores).

Presets: `tiny` (the 64-wide test model), `smollm2` (the embedded SmolLM2-135M), `llama7b-shape` (random weights in
the official LLaMA-7B shape: 32 layers, width 4096, 32 heads, FFN 11008, vocabulary 32000; `--llama7b-layers`
shortens it for a CPU smoke run). On CUDA the overheads come from wall-clock time, on the CPU from CPU time.
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


# Where the published model adds a tuned bias (model.py: wq, wo, w1, w2, w3).
TUNED_BIASES = {'self_attn': ('q_proj', 'o_proj'), 'mlp': ('gate_proj', 'up_proj', 'down_proj')}


def _with_tuned_biases(backbone) -> tuple[object, float]:
    """The plain backbone plus ImageBind-LLM's five tuned biases per layer: the floor of what the published model
    computes per token beyond its backbone, whatever the implementation."""
    import torch

    generator = torch.Generator().manual_seed(0)
    for layer in backbone.model.model.layers:
        for parent, names in TUNED_BIASES.items():
            for name in names:
                linear = getattr(getattr(layer, parent), name)
                bias = 0.02 * torch.randn(linear.out_features, generator=generator)
                linear.bias = torch.nn.Parameter(bias.to(linear.weight), requires_grad=False)
    return backbone.model, 0.0


def _injected(backbone, merge: bool = False) -> tuple[object, float]:
    """Wrap the backbone with ImageBind-LLM (merged if asked) and set one random visual feature.

    The adapter gets small random gates, LoRA factors and biases, like a trained checkpoint (zeros could take
    faster paths). Returns (model, setup seconds); the setup is the per-query visual work only, not the merge.
    """
    import torch

    from mm_llm_ros.core.llm.model import ImageBindLLM

    model = ImageBindLLM(backbone.model).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(('gate', 'lora_b.weight', '.bias')):
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(0.02 * noise)
    if merge:
        model.merge_adapters()
    feature = torch.nn.functional.normalize(torch.randn(model.config.embed_dim), dim=0)
    _synchronize(model.device)
    start = time.perf_counter()
    model.set_visual_features(feature)
    _synchronize(model.device)
    return model, time.perf_counter() - start


def _merged(backbone) -> tuple[object, float]:
    return _injected(backbone, merge=True)


VARIANTS: dict[str, Callable] = {'backbone': _plain, 'backbone + tuned biases': _with_tuned_biases,
                                  'imagebind-llm': _injected, 'imagebind-llm merged': _merged}


def _synchronize(device) -> None:
    """Wait for queued CUDA kernels, so that wall-clock intervals cover the work they launched."""
    import torch

    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def llama7b_shape_backbone(device, dtype, layers: int = 32, hidden: int = 4096, intermediate: int = 11008,
                           heads: int = 32):
    """Random weights in the shape of the official LLaMA-7B `params.json` (dim 4096, 32 heads, FFN 11008, vocab
    32000), initialised directly on `device` in `dtype`, with the tiny preset's byte-level tokenizer (prompts use
    ids below 259; sampled ids beyond it decode to nothing, which the timing does not care about). `layers`,
    `hidden`, `intermediate` and `heads` shrink it for CPU smoke runs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mm_llm_ros.core.llm.backbones import Backbone, byte_tokenizer
    from mm_llm_ros.core.llm.tokenizer import HFTokenizer

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    shape = f'{layers} layers' if hidden == 4096 else f'{layers} layers, width {hidden}'
    return Backbone(model=model.eval(), tokenizer=HFTokenizer(tokenizer), name=f'llama7b-shape ({shape})')


def _presets(cache_dir: pathlib.Path | None, device, dtype, llama7b_layers: int) -> dict[str, Callable]:
    from mm_llm_ros.core.llm.backbones import load_smollm2, tiny_random_backbone

    def tiny():
        backbone = tiny_random_backbone(seed=0)
        backbone.model.to(device=device, dtype=dtype)
        return backbone

    return {'tiny': tiny,
            'smollm2': lambda: load_smollm2(cache_dir=cache_dir, dtype=dtype, device=device),
            'llama7b-shape': lambda: llama7b_shape_backbone(device, dtype, llama7b_layers)}


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
    from mm_llm_ros.core.llm.model import ImageBindLLM
    from mm_llm_ros.core.llm.prompt import PromptBuilder

    config = GenerationConfig(max_new_tokens=new_tokens, seed=0, stop_on_eos=False)
    backbones = {variant: load() for variant in VARIANTS}  # fresh copies: ImageBindLLM patches its backbone in place
    tokenizer = backbones['backbone'].tokenizer
    prompt = PromptBuilder().encode(tokenizer, INSTRUCTION)
    models, setups, timings = {}, {}, {}
    for variant, wrap in VARIANTS.items():
        models[variant], setups[variant] = wrap(backbones[variant])
        timings[variant] = []
    # What LLMAnswerer runs per token: the patched backbone itself, not the ImageBindLLM wrapper around it.
    runners = {variant: model.backbone if isinstance(model, ImageBindLLM) else model
               for variant, model in models.items()}
    for runner in runners.values():
        _timed_generation(runner, tokenizer, prompt, config)  # warm-up: first-call allocations
    for _ in range(repeats):
        for variant, runner in runners.items():
            timings[variant].append(_timed_generation(runner, tokenizer, prompt, config))

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


def _markdown(rows: list[Row], loads: dict[str, float], device, dtype, threads: int, repeats: int,
              new_tokens: int) -> str:
    import torch

    from mm_llm_ros.core.device import describe

    on_cpu = device.type == 'cpu'
    where = f'{platform.processor() or platform.machine()}, {threads} thread(s)' if on_cpu else describe(device, dtype)
    basis = ('CPU time (on a loaded machine wall-clock is inflated by waiting for a core)' if on_cpu
             else 'wall-clock time (CUDA work is synchronised by each sampled token)')
    lines = [
        f'# LLM generation speed ({"CPU" if on_cpu else "GPU"})',
        '',
        f'{where}, {str(dtype).removeprefix("torch.")}, torch {torch.__version__}; median of {repeats} runs after '
        f'one warm-up; {new_tokens} new tokens, temperature 0.1, top-p 0.75.',
        f'TTFT = prompt prefill + first token. Wall-clock and CPU-time columns; the overheads (ImageBind-LLM relative '
        f'to the same backbone, same run) are computed from {basis}. `imagebind-llm merged` is what `build_answerer` '
        'serves (LoRA pairs and biases folded into the base weights, the visual vector into wo\'s bias, by '
        '`ImageBindLLM.merge_adapters`); `imagebind-llm` runs them unmerged.',
        '',
        '| preset | variant | parameters | prompt tokens | visual setup (ms) | TTFT (ms) | TTFT CPU (ms) | '
        'tokens/s | tokens/CPU-s | TTFT overhead | time/token overhead |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    ttft, speed = ('ttft_cpu_ms', 'tokens_per_cpu_s') if on_cpu else ('ttft_ms', 'tokens_per_s')
    baselines = {row.preset: row for row in rows if row.variant == 'backbone'}
    for row in rows:
        base = baselines.get(row.preset)
        if row.variant == 'backbone' or base is None:
            ttft_overhead = speed_overhead = '-'
        else:
            ttft_overhead = f'{100 * (getattr(row, ttft) / getattr(base, ttft) - 1):+.1f}%'
            speed_overhead = f'{100 * (getattr(base, speed) / getattr(row, speed) - 1):+.1f}%'
        lines.append(f'| {row.preset} | {row.variant} | {row.parameters / 1e6:.2f}M | {row.prompt_tokens} | '
                     f'{row.setup_ms:.1f} | {row.ttft_ms:.1f} | {row.ttft_cpu_ms:.1f} | {row.tokens_per_s:.1f} | '
                     f'{row.tokens_per_cpu_s:.1f} | {ttft_overhead} | {speed_overhead} |')
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    memory = f'Peak RSS of the benchmark process: {peak_rss_mb:.0f} MB'
    if not on_cpu:
        memory += f'; peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB'
    lines += ['', 'Backbone load time (SmolLM2 from its converted cache; its first use converts the GGUF once): '
              + ', '.join(f'{name} {seconds:.2f} s' for name, seconds in loads.items()) + f'. {memory}.', '']
    return '\n'.join(lines)


def run(presets: Sequence[str], threads: int, repeats: int, new_tokens: int, cache_dir: pathlib.Path | None,
        out: pathlib.Path, device_name: str = 'cpu', dtype_name: str = 'auto', llama7b_layers: int = 32) -> str:
    """Benchmark, write `out` (atomically), return the Markdown."""
    import torch

    from mm_llm_ros.core.device import resolve_device, resolve_dtype

    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    loaders = _presets(cache_dir, device, dtype, llama7b_layers)
    loads = {}
    for preset in presets:
        if preset != 'llama7b-shape':  # warm-up: imports, and the first SmolLM2 use converts its GGUF
            loaders[preset]()
        loads[preset] = _load_seconds(loaders[preset])
    rows = [row for preset in presets for row in _measure(preset, loaders[preset], repeats, new_tokens)]
    markdown = _markdown(rows, loads, device, dtype, threads, repeats, new_tokens)
    write_markdown(out, markdown)
    return markdown


def write_markdown(out: pathlib.Path, text: str) -> None:
    """Write a results table atomically (a reader never sees half a table), creating its folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + '.tmp')
    tmp.write_text(text)
    tmp.replace(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--presets', nargs='+', default=['tiny', 'smollm2'],
                        choices=['tiny', 'smollm2', 'llama7b-shape'])
    parser.add_argument('--threads', type=int, default=1, help='torch intra-op threads')
    parser.add_argument('--repeats', type=int, default=9, help='timed generations per variant')
    parser.add_argument('--new-tokens', type=int, default=64, help='tokens decoded per generation')
    parser.add_argument('--cache-dir', type=pathlib.Path, default=None,
                        help='backbone conversion cache (default: $XDG_CACHE_HOME/mm_llm_ros)')
    parser.add_argument('--device', default='cpu', help='cpu, cuda or cuda:N')
    parser.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'float16', 'bfloat16'],
                        help='auto: float16 on CUDA, float32 on the CPU')
    parser.add_argument('--llama7b-layers', type=int, default=32,
                        help='decoder layers of the llama7b-shape preset (fewer for a CPU smoke run)')
    parser.add_argument('--out', type=pathlib.Path, default=None,
                        help='default: bench/results/llm.md on the CPU, bench/results/llm-cuda.md on CUDA')
    args = parser.parse_args(argv)
    out = args.out or REPO / 'bench' / 'results' / ('llm.md' if args.device == 'cpu' else 'llm-cuda.md')
    print(run(args.presets, args.threads, args.repeats, args.new_tokens, args.cache_dir, out, args.device,
              args.dtype, args.llama7b_layers))


if __name__ == '__main__':
    sys.path.insert(0, str(REPO / 'mm_llm_ros'))  # the source tree, like the unit tests
    main()
