"""Drift and speed of weight-only quantisation (llm.quantization) on the CPU: fp32 vs int8 vs int4.

    .venv/bin/python bench/quantization.py [--presets tiny smollm2] [--modes int8 int4] [--prompts 20]
                                           [--new-tokens 32] [--threads 1 2] [--cache-dir DIR]
                                           [--out bench/results/quantization.md]

Per preset, one fp32 backbone and one quantised copy per mode (`quantize_linear_weights`, what `build_answerer`
applies after the merge; here on the bare backbone, whose seven projections per layer are the same ones), all in
one process:
- weight bytes: every parameter (shared ones once, quantised tensors by their packed data and scales), and the
  decoder-layer projections alone (what is quantised);
- drift: max |logit difference| against fp32 over every position of `--prompts` teacher-forced prompts, also as a
  fraction of the fp32 logit range, and how often the top-1 token of a position agrees;
- greedy agreement: `--new-tokens` greedy tokens per prompt (all prompts in one left-padded batch with the KV
  cache, fp32 and quantised alike), compared with fp32's: the first divergent index (median and minimum over prompts; = new-tokens when identical), the
  share of prompts with identical continuations and of positions with equal tokens;
- decode speed: greedy `generate_stream` tokens/s (wall-clock, after the first token) at each `--threads` count,
  the median of 2 prompts, the modes taking turns so that a changing load on a shared machine hits them alike.

Prompts are Alpaca-formatted robot questions. EOS is ignored so every run decodes exactly `--new-tokens` tokens.

A second table, computed rather than measured: the GPU memory of ImageBind-huge (fp16) + ImageBind-LLM-7B per mode
plus a 512-token KV cache, from this repository's model code built on the meta device, against common robot GPUs.
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO / 'bench') not in sys.path:
    sys.path.insert(0, str(REPO / 'bench'))

from llm import write_markdown  # noqa: E402  (bench/llm.py)
QUESTIONS = [
    'Describe what a mobile robot should do when it sees a closed door in a corridor.',
    'What objects are usually found on a kitchen table?',
    'How should a robot greet a person entering the room?',
    'List three hazards a cleaning robot may meet in an office.',
    'What does a red traffic light mean for a delivery robot crossing a street?',
    'Explain how to find a charging station in an unknown building.',
    'What sound does a smoke alarm make, and what should a robot do when it hears one?',
    'Summarise the scene: a dog is sleeping on a sofa next to a window.',
    'Which way should a robot turn to avoid a wet floor sign on its left?',
    'How can a robot tell whether a cup is full or empty?',
    'What should a warehouse robot do when a pallet blocks the aisle?',
    'Give two reasons why a lidar may miss a glass wall.',
    'Write one sentence telling a visitor where the elevator is.',
    'What is the safest speed for a robot in a crowded hallway?',
    'Describe the colour and shape of a typical fire extinguisher.',
    'How should a robot react when a child waves at it?',
    'What does it mean when a door handle is turned downwards?',
    'Name the rooms a hospital delivery robot visits most often.',
    'How can a robot check that a staircase is ahead?',
    'What should a robot say when it cannot understand a question?',
]


# Per --modes entry, the (row label, llm.quantization, model dtype) variants compared with the fp32 backbone ('none').
# torch's CPU int4 kernel is fast only with bfloat16 activations (check_quantization refuses it otherwise), so int4
# runs a bfloat16 model, next to the plain bfloat16 model that shows how much of its drift bfloat16 alone causes.
# The embedded SmolLM2 is a dequantised Q4_1 GGUF (4-bit in groups of 32), so int4 also runs with groups of 32 (what
# build_answerer uses for it), which restore that grid.
VARIANTS = {'int8': [('int8', 'int8', 'float32', None)],
            'int4': [('bf16', 'none', 'bfloat16', None), ('int4 (bf16)', 'int4', 'bfloat16', None),
                     ('int4 g32 (bf16)', 'int4', 'bfloat16', 32)]}


@dataclass
class Row:
    preset: str
    mode: str
    quantised: int
    total_bytes: int
    linear_bytes: int
    max_abs: float
    max_rel: float
    top1: float
    first_divergence: list[int]
    equal_positions: float
    tokens_per_s: dict[int, float]


def _linear_bytes(model) -> int:
    from mm_llm_ros.core.llm.quantization import parameter_bytes

    return sum(parameter_bytes(module) for layer in model.model.layers for module in layer.modules()
               if isinstance(module, __import__('torch').nn.Linear))


def _batched_greedy(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> tuple[list, list[list[int]]]:
    """All prompts at once, left-padded: each prompt's logits at its own positions, and its greedy tokens.

    One batched prefill and `new_tokens` batched steps with the KV cache (positions from the attention mask, as
    transformers' generate computes them); fp32 and the quantised copies run the same batches, so the comparison
    is like for like, and it costs ~new_tokens forwards rather than prompts x new_tokens.
    """
    import torch

    from mm_llm_ros.core.llm.decoding import cache_keyword, output_cache

    length = max(len(prompt) for prompt in prompts)
    ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits = [out.logits[row, length - len(p):].float() for row, p in enumerate(prompts)]
        tokens = []
        for _ in range(new_tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_keyword(): output_cache(out)})
    return logits, torch.cat(tokens, dim=-1).tolist()


def _greedy(model, tokenizer, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """Greedy token ids and wall-clock tokens/s after the first token."""
    from mm_llm_ros.core.llm.generation import GenerationConfig, generate_stream

    config = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, stop_on_eos=False)
    tokens, first = [], None
    for event in generate_stream(model, tokenizer, prompt, config):
        now = time.perf_counter()
        first = now if first is None else first
        tokens.append(event.token_id)
    return tokens, (len(tokens) - 1) / (now - first)


def _measure(preset: str, load: Callable, modes: Sequence[str], prompt_count: int, new_tokens: int,
             threads: Sequence[int]) -> list[Row]:
    import torch

    from mm_llm_ros.core.llm.prompt import PromptBuilder
    from mm_llm_ros.core.llm.quantization import check_quantization, parameter_bytes, quantize_linear_weights

    torch.manual_seed(0)
    backbone = load()
    tokenizer = backbone.tokenizer
    models = {'none': backbone.model}
    counts = {'none': 0}
    for mode in modes:
        for label, applied, dtype, group in VARIANTS[mode]:
            dtype = getattr(torch, dtype)
            check_quantization(applied, 'cpu', dtype)
            models[label] = load().model.to(dtype)
            counts[label] = quantize_linear_weights(models[label], applied, int4_group_size=group)
    builder = PromptBuilder()
    prompts = [builder.encode(tokenizer, question) for question in (QUESTIONS * 2)[:prompt_count]]

    torch.set_num_threads(max(threads))
    logits, greedy = {}, {}
    for mode, model in models.items():
        logits[mode], greedy[mode] = _batched_greedy(model, prompts, new_tokens, tokenizer.eos_id or 0)
    speeds: dict[str, dict[int, list[float]]] = {mode: {n: [] for n in threads} for mode in models}
    for n in threads:
        torch.set_num_threads(n)
        for model in models.values():
            _greedy(model, tokenizer, prompts[0], 4)  # warm-up at this thread count
        for prompt in prompts[:2]:
            for mode, model in models.items():
                speeds[mode][n].append(_greedy(model, tokenizer, prompt, new_tokens)[1])

    rows = []
    for mode, model in models.items():
        diffs = [(got - ref).abs().max().item() for got, ref in zip(logits[mode], logits['none'], strict=True)]
        spreads = [(ref.max() - ref.min()).item() for ref in logits['none']]
        agree = [(got.argmax(-1) == ref.argmax(-1)).float().mean().item()
                 for got, ref in zip(logits[mode], logits['none'], strict=True)]
        firsts, equal = [], []
        for got, ref in zip(greedy[mode], greedy['none'], strict=True):
            firsts.append(next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref)))
            equal.append(sum(a == b for a, b in zip(got, ref)) / len(ref))
        rows.append(Row(preset, mode, counts[mode], parameter_bytes(model), _linear_bytes(model), max(diffs),
                        max(d / s for d, s in zip(diffs, spreads, strict=True)), statistics.mean(agree), firsts,
                        statistics.mean(equal), {n: statistics.median(speeds[mode][n]) for n in threads}))
    return rows


def _markdown(rows: list[Row], prompt_count: int, new_tokens: int, threads: Sequence[int], seconds: float) -> str:
    import torch
    import torchao

    lines = [
        '# Weight-only quantisation on the CPU: drift and speed against fp32',
        '',
        f'{platform.processor() or platform.machine()}, torch {torch.__version__}, torchao {torchao.__version__}; '
        f'{prompt_count} Alpaca prompts, {new_tokens} greedy tokens each (one left-padded batch, EOS ignored). '
        'int8: per-channel symmetric; int4: groupwise asymmetric (tinygemm CPU packing; group 128, else the largest '
        'of 64/32 dividing the width: 64 for the 64-wide tiny model and SmolLM2\'s 576-wide projections; `g32`: '
        'groups of 32, what build_answerer uses for the embedded SmolLM2, a dequantised Q4_1 GGUF) in a '
        'bfloat16 model, the only dtype the CPU int4 kernel is fast for; `bf16` is that model unquantised. lm_head, '
        'embeddings and norms stay in the model dtype. Every row is compared with fp32 (`none`). Bench: '
        '`bench/quantization.py`; method in its docstring.',
        '',
        '| preset | mode | quantised weights | all weights (MB) | decoder projections (MB) | max \\|Δlogit\\| | '
        'max \\|Δlogit\\| / logit range | top-1 agreement (prompt positions) | first divergent token (median / min) '
        '| identical continuations | equal tokens | ' + ' | '.join(f'tokens/s, {n} thread(s)' for n in threads) + ' |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|' + '---:|' * len(threads),
    ]
    for row in rows:
        identical = sum(first == new_tokens for first in row.first_divergence) / len(row.first_divergence)
        speed = ' | '.join(f'{row.tokens_per_s[n]:.1f}' for n in threads)
        lines.append(f'| {row.preset} | {row.mode} | {row.quantised} | {row.total_bytes / 1e6:.2f} | '
                     f'{row.linear_bytes / 1e6:.2f} | {row.max_abs:.4f} | {100 * row.max_rel:.2f}% | '
                     f'{100 * row.top1:.1f}% | {statistics.median(row.first_divergence):.0f} / '
                     f'{min(row.first_divergence)} | {100 * identical:.0f}% | {100 * row.equal_positions:.1f}% | '
                     f'{speed} |')
    lines += ['', f'First divergent token = {new_tokens} means all {new_tokens} tokens equal fp32\'s. Speeds are '
              'wall-clock medians on a shared machine: compare modes within a row group, not across runs. In eager '
              'mode int8 casts each weight to float per call (smaller at rest, not faster); see '
              'docs/quantization.md for the GPU picture.', f'Benchmark run time: {seconds:.0f} s.', '']
    return '\n'.join(lines)


# Robot GPUs: (name, memory in GiB (what is sold as 'GB'), unified with the CPU/OS (Jetson) or discrete).
GPUS = [('Jetson Orin Nano 8 GB', 8, True), ('Jetson Orin NX 16 GB', 16, True), ('Jetson AGX Orin 32 GB', 32, True),
        ('Jetson AGX Orin 64 GB', 64, True), ('RTX 4060 8 GB', 8, False), ('RTX 4090 24 GB', 24, False),
        ('L4 24 GB', 24, False), ('A100 80 GB', 80, False), ('H100 80 GB', 80, False)]
# Assumed memory the model cannot use: on a Jetson the OS, ROS and the CUDA context share the same DRAM; on a
# discrete GPU the CUDA context, activations and allocator slack. Assumptions, not measurements (see the docs).
HEADROOM_GIB = {True: 2.5, False: 1.0}
GIB = 2 ** 30
KV_TOKENS = 512
FP16 = 2


def _meta_models():
    """ImageBind-huge and ImageBind-LLM-7B built from this repository's code on the meta device (no memory)."""
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._device import _device_constructors
    from transformers import LlamaConfig, LlamaForCausalLM

    from mm_llm_ros.core.imagebind import official
    from mm_llm_ros.core.imagebind.model import ImageBindConfig
    from mm_llm_ros.core.llm.model import ImageBindLLM

    class Meta(TorchFunctionMode):
        """torch.device('meta'), except linspace: ImageBind's constructor reads drop-path rates with .item()."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in _device_constructors() and kwargs.get('device') is None:
                kwargs['device'] = 'cpu' if func is torch.linspace else 'meta'
            return func(*args, **kwargs)

    # The official LLaMA-7B params.json: dim 4096, 32 layers and heads, FFN 11008, vocabulary 32000, untied head.
    llama = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
    with Meta():
        imagebind = official.model_class()(**ImageBindConfig(preset='huge').model_kwargs())
        model = ImageBindLLM(LlamaForCausalLM(llama))
    return imagebind, model, llama


def _projection_bytes(out_features: int, in_features: int, mode: str) -> int:
    """Bytes of one quantised fp16 projection as torchao 0.18 stores it on CUDA (equal, byte for byte, to the real
    tensors of a LLaMA-7B layer quantised on an H200: see docs/quantization.md)."""
    if mode == 'none':
        return out_features * in_features * FP16
    if mode == 'int8':  # Int8Tensor: int8 data, a float32 scale and an int8 zero point (0) per output row
        return out_features * in_features + out_features * 5
    # int4 tile_packed_to_4d: the weight padded to (multiple of 8, multiple of 1024), two values per byte, and a
    # bfloat16 (scale, zero) pair per group of 128 inputs and output row.
    rows, columns = -(-out_features // 8) * 8, -(-in_features // 1024) * 1024
    return rows * columns // 2 + (columns // 128) * rows * 2 * FP16


def memory_markdown() -> str:
    """The memory table of docs/quantization.md: ImageBind-huge fp16 + ImageBind-LLM-7B per mode + KV cache."""
    from torch import nn

    imagebind, model, llama = _meta_models()
    imagebind_params = sum(p.numel() for p in imagebind.parameters())
    llm_params = sum(p.numel() for p in model.parameters())
    backbone_params = sum(p.numel() for p in model.backbone.parameters()) - sum(
        p.numel() for name, p in model.backbone.named_parameters() if 'lora' in name or name.endswith(('.bias', 'gate')))
    projections = [m for layer in model.layers for name, m in layer.named_modules()
                   if isinstance(m, nn.Linear) and not name.endswith(('lora_a', 'lora_b'))]
    projection_params = sum(m.weight.numel() for m in projections)
    kv = 2 * llama.num_hidden_layers * KV_TOKENS * llama.num_key_value_heads * (
        llama.hidden_size // llama.num_attention_heads) * FP16
    totals, llms = {}, {}
    lines = [
        '## GPU memory: ImageBind-huge fp16 + ImageBind-LLM-7B', '',
        f'Counted from this repository\'s model code on the meta device: ImageBind-huge {imagebind_params:,} '
        f'parameters; ImageBind-LLM-7B {llm_params:,} (LLaMA-7B {backbone_params:,}, of which {len(projections)} '
        f'decoder projections with {projection_params:,} weights are what `llm.quantization` quantises; the rest is '
        'the bind network, prefix queries, LoRA factors, tuned biases and gates, embeddings, lm_head and norms, kept '
        f'in fp16). KV cache: {KV_TOKENS} tokens in fp16. GiB = 2^30 bytes.', '',
        '| mode | ImageBind-huge fp16 (GiB) | ImageBind-LLM-7B (GiB) | KV cache (GiB) | total (GiB) |',
        '|---|---:|---:|---:|---:|',
    ]
    for mode in ('none', 'int8', 'int4'):
        llm = (llm_params - projection_params) * FP16 + sum(
            _projection_bytes(m.out_features, m.in_features, mode) for m in projections)
        llms[mode] = llm + kv
        totals[mode] = imagebind_params * FP16 + llm + kv
        lines.append(f'| {mode} | {imagebind_params * FP16 / GIB:.2f} | {llm / GIB:.2f} | {kv / GIB:.2f} | '
                     f'{totals[mode] / GIB:.2f} |')
    lines += ['', f'GiB left after the whole stack and an assumed headroom ({HEADROOM_GIB[True]} GiB on a Jetson, '
              f'whose DRAM the OS and ROS share; {HEADROOM_GIB[False]} GiB on a discrete GPU for the CUDA context, '
              'activations and allocator slack): ✓ fits, ✗ does not. The last column leaves ImageBind out (encoders '
              'on the CPU or another device): the int4 LLM and its KV cache only.', '',
              '| GPU | none (fp16) | int8 | int4 | int4, LLM only |', '|---|---:|---:|---:|---:|']
    for name, gibibytes, unified in GPUS:
        cells = []
        for used in (totals['none'], totals['int8'], totals['int4'], llms['int4']):
            left = gibibytes - HEADROOM_GIB[unified] - used / GIB
            cells.append(f'{"✓" if left >= 0 else "✗"} {left:+.1f}')
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines + [''])


def run(presets: Sequence[str], modes: Sequence[str], prompt_count: int, new_tokens: int, threads: Sequence[int],
        cache_dir: pathlib.Path | None, out: pathlib.Path) -> str:
    """Benchmark, write `out` (atomically), return the Markdown."""
    from mm_llm_ros.core.llm.quantization import preload_torchao

    preload_torchao()  # before transformers imports it (noisily) with its modeling code
    from mm_llm_ros.core.llm.backbones import load_smollm2, tiny_random_backbone

    loaders = {'tiny': lambda: tiny_random_backbone(seed=0), 'smollm2': lambda: load_smollm2(cache_dir=cache_dir)}
    start = time.perf_counter()
    rows = [row for preset in presets
            for row in _measure(preset, loaders[preset], modes, prompt_count, new_tokens, threads)]
    markdown = _markdown(rows, prompt_count, new_tokens, threads, time.perf_counter() - start) + '\n' + \
        memory_markdown()
    write_markdown(out, markdown)
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--presets', nargs='+', default=['tiny', 'smollm2'], choices=['tiny', 'smollm2'])
    parser.add_argument('--modes', nargs='+', default=['int8', 'int4'], choices=['int8', 'int4'])
    parser.add_argument('--prompts', type=int, default=20, help='prompts for the drift and greedy agreement')
    parser.add_argument('--new-tokens', type=int, default=32, help='greedy tokens per prompt')
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 2], help='torch intra-op thread counts')
    parser.add_argument('--cache-dir', type=pathlib.Path, default=None,
                        help='backbone conversion cache (default: $XDG_CACHE_HOME/mm_llm_ros)')
    parser.add_argument('--out', type=pathlib.Path, default=REPO / 'bench' / 'results' / 'quantization.md')
    args = parser.parse_args(argv)
    print(run(args.presets, args.modes, args.prompts, args.new_tokens, args.threads, args.cache_dir, args.out))


if __name__ == '__main__':
    sys.path.insert(0, str(REPO / 'mm_llm_ros'))  # the source tree, like the unit tests
    main()
