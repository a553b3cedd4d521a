"""CPU decode speed of the embedded default (issue 18): today's fp32 path against `llm.quantization: int8`, the
memory-bandwidth limit measured in the same run, and int8's greedy agreement with fp32.

    .venv/bin/python bench/cpu.py [--threads 1 2] [--repeats 5] [--new-tokens 64] [--prompts 20]
                                  [--agreement-tokens 32] [--out bench/results/cpu.md]

One process, the embedded SmolLM2-135M merged as `build_answerer` serves it (zero-gated bind network, as shipped
without an adapter checkpoint), greedy decoding through the static decoder:

- `fp32, whole-cache attention (before issue 18)`: the static step as it was, attention over every slot of the KV
  cache with a mask (the node's context is 1024 slots);
- `fp32, op-by-op step`: the static step with attention over the written slots only, through transformers'
  modules and one torch call per operation (what `none` ran before the lean float32 step);
- `fp32, lean step, row-major weights`: the same operations in `lean_step.LeanDecodeStep`, on the weights as loaded
  (what `none` ran before the column-major layout);
- `fp32 (llm.quantization none)`: today's static step: the lean step on the weights as `build_imagebind_llm` stores
  them for a float32 CPU model (`lean_step.store_column_major`: column-major, q/k/v and gate/up joined);
- `int8 (llm.quantization int8)`: the same plus `cpu_int8` (decode rows through torch's VNNI int8 kernel).

Per thread count the variants take turns, `--repeats` times each after one warm-up, so that other jobs on a shared
machine slow them alike (in the listed order, reversed every other round); the table gives medians of wall-clock
time. TTFT is the prefill of a long (about 220-token) prompt plus the first token; tokens/s the `--new-tokens`
greedy tokens after it. The bandwidth limit is the bytes a decode step must read (every projection and lm_head
weight, at the variant's bytes per weight) divided by the read bandwidth measured here (a sum over a 256 MB tensor,
same thread count).

llama.cpp, the baseline of the issue, runs in the same loop when `llama_cpp` (llama-cpp-python, an optional bench
dependency, never a test one: `pip install llama-cpp-python`) is importable: the shipped Q4_1 GGUF, and Q8_0 and
F32 files that llama.cpp's own quantiser writes from it into a temporary folder (the F32 weights are exactly the
ones our fp32 model loads). It is timed through the same `_run` on the same prompt ids. Without it, the issue's
numbers (same weights, same machine type) are quoted beside the table, labelled as such. Each llama.cpp file is
first loaded and run on three tokens in a child process: where that crashes (llama.cpp's repacked Q8_0 kernels
segfault on the AMX machine of 2026-12-05), the file is loaded without repacked weight buffers (`use_extra_bufts`
off) and its row says so.

Demo latency (`--answers N`): seconds per answer of `config/demo.yaml`'s llm_node on the first N grounded-benchmark
questions, before issue 18 (fp32, whole-cache attention, no prompt-prefix reuse), `none` and `int8` now.

Agreement: `--prompts` instructions, `--agreement-tokens` greedy tokens each, int8 against fp32: the index of the
first token that differs (the length when none does) and how many continuations are identical; and how many of
fp32's continuations are those of the row-major weights (the layout changes the summation order only).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]

INSTRUCTIONS = [
    'Describe what a mobile robot should do when it sees a closed door in a corridor.',
    'What is the nearest obstacle ahead?', 'Is anyone talking near the robot?', 'What text can you read?',
    'How many people are in the room?', 'Should the robot stop or continue?', 'What sound did you hear?',
    'Which way is the exit?', 'Is the floor wet?', 'What colour is the box on the left?',
    'Summarise the scene in one sentence.', 'Is it safe to move forward?', 'What is behind the robot?',
    'Where is the charging station?', 'Is the door open or closed?', 'What time is shown on the clock?',
    'Can you see any stairs?', 'Name one object on the table.', 'How far is the wall on the right?',
    'What should the robot report to the operator?',
]
CONTEXT = ('Readings: text "EXIT 3 -> LOADING BAY"; sounds: speech 0.62, footsteps 0.21, door 0.09; nearest front '
           '2.4 m, left 0.8 m, right 3.1 m, back none; objects around the robot: 7; battery 64 %; floor: tiles, '
           'dry; lights on; one person standing 3 m ahead, facing the robot, holding a box; a trolley parked to the '
           'left of the door; a sign above the door reads "Authorised staff only"; the corridor continues to the '
           'right for about 15 m and ends at a lift; it is 14:05 and the building is open to visitors until 18:00.')


def _merged_smollm2(cache_dir):
    from mm_llm_ros.core.llm.backbones import load_smollm2
    from mm_llm_ros.core.llm.model import ImageBindLLM

    backbone = load_smollm2(cache_dir)
    model = ImageBindLLM(backbone.model).eval()
    model.merge_adapters()
    return model, backbone.tokenizer


def _decoders(model, capacity: int) -> dict[str, object]:
    """The variants over copies of the same merged model (`model` keeps its row-major weights)."""
    from mm_llm_ros.core.llm.cpu_int8 import apply_cpu_int8
    from mm_llm_ros.core.llm.decoding import StaticDecoder
    from mm_llm_ros.core.llm.lean_step import store_column_major

    before = StaticDecoder(model.backbone, capacity)
    _before_issue_18(before)  # the fixed-shape step: the whole cache, masked (what 'static' ran)
    op_by_op = StaticDecoder(model.backbone, capacity)
    op_by_op._lean_step = None  # the generic step: transformers' modules, one torch call per operation
    column_major = copy.deepcopy(model)
    store_column_major(column_major.backbone)
    fast = copy.deepcopy(model)
    apply_cpu_int8(fast)
    return {'fp32, whole-cache attention (before issue 18)': before,
            'fp32, op-by-op step': op_by_op,
            'fp32, lean step, row-major weights': StaticDecoder(model.backbone, capacity),
            'fp32 (llm.quantization none)': StaticDecoder(column_major.backbone, capacity),
            'int8 (llm.quantization int8)': StaticDecoder(fast.backbone, capacity)}


def _run(decoder, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(TTFT s, decode tokens/s, greedy tokens) of one generation."""
    import torch

    decoder._prompt = []  # a fresh prompt each time: no prefix reuse between timed runs
    with torch.inference_mode():
        start = time.perf_counter()
        tokens = [int(decoder.prefill(prompt).argmax())]
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            tokens.append(int(decoder.step(tokens[-1]).argmax()))
        end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first), tokens


def read_bandwidth(repeats: int = 7) -> float:
    """GB/s that `sum` reads a 256 MB float32 tensor at (the current torch thread count); the median of `repeats`."""
    import torch

    data = torch.ones(64 * 2**20)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times) / 1e9


def step_bytes(model) -> dict[str, int]:
    """Weight bytes one decode step reads: fp32 (4 per weight) and int8 (1 per weight + a 4-byte scale per row), over
    the decoder projections and lm_head."""
    from torch import nn

    shapes = [module.weight.shape for name, module in model.backbone.model.layers.named_modules()
              if isinstance(module, nn.Linear) and not name.endswith(('lora_a', 'lora_b'))]
    shapes.append(model.backbone.lm_head.weight.shape)
    return {'fp32': sum(4 * rows * cols for rows, cols in shapes),
            'int8': sum(rows * (cols + 4) for rows, cols in shapes)}


# Contender -> the llama_cpp file type its quantiser writes from the shipped Q4_1 GGUF.
LLAMA_CPP_REQUANTISED = {'llama.cpp Q8_0': 'LLAMA_FTYPE_MOSTLY_Q8_0', 'llama.cpp F32': 'LLAMA_FTYPE_ALL_F32'}


class LlamaCppDecoder:
    """llama.cpp (llama-cpp-python) behind the static decoder's prefill/step interface, so that `_run` times it
    exactly as it times ours: the same prompt ids, greedy argmax on the host, logits of the last position only."""

    def __init__(self, gguf, threads: int, capacity: int, repack: bool = True) -> None:
        from llama_cpp import Llama

        with contextlib.nullcontext() if repack else _without_repacking():
            self.llm = Llama(model_path=str(gguf), n_ctx=capacity, n_threads=threads, n_threads_batch=threads,
                             n_batch=capacity, logits_all=False, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        self._prompt: list[int] = []  # what `_run` resets; llama.cpp keeps no prefix between our runs

    def _logits(self):
        import llama_cpp
        import numpy
        import torch

        # The last position's logits straight from the context: llama-cpp-python keeps them only with logits_all.
        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return torch.from_numpy(numpy.ctypeslib.as_array(logits, shape=(self.vocab_size,)).copy())

    def prefill(self, prompt):
        self.llm.reset()
        self.llm.eval(list(prompt))
        return self._logits()

    def step(self, token: int):
        self.llm.eval([token])
        return self._logits()


@contextlib.contextmanager
def _without_repacking():
    """Load llama.cpp models without repacked weight buffers. llama-cpp-python's `Llama` has no argument for
    `use_extra_bufts` and reads its model parameters from `llama_model_default_params()`, so that is swapped for
    the duration."""
    import llama_cpp.llama_cpp as native

    default = native.llama_model_default_params

    def without():
        params = default()
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without
    try:
        yield
    finally:
        native.llama_model_default_params = default


_PROBE = ('import sys; from llama_cpp import Llama; '
          'Llama(model_path=sys.argv[1], n_ctx=64, verbose=False).eval([1, 2, 3])')


def repacking_runs(gguf: pathlib.Path) -> bool:
    """Whether llama.cpp, as built here, runs `gguf` with its default repacked weight buffers: a child process loads
    it and evaluates three tokens (a crash there would take this process down)."""
    try:
        return subprocess.run([sys.executable, '-c', _PROBE, str(gguf)], capture_output=True, timeout=300,
                              check=False).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C libraries write there directly) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, 'w') as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def llama_cpp_models(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """The shipped SmolLM2 GGUF (Q4_1) and llama.cpp's own Q8_0 and F32 of it in `folder`, by contender name; {}
    where llama_cpp is not importable. The F32 file holds the dequantised Q4_1 weights, which are exactly the
    weights our fp32 model loads (transformers dequantises the same file)."""
    import ctypes
    import importlib.util

    if importlib.util.find_spec('llama_cpp') is None:
        return {}
    import llama_cpp

    from mm_llm_ros.core.llm.backbones import find_smollm2_gguf

    shipped = find_smollm2_gguf()
    models = {'llama.cpp Q4_1 (as shipped)': shipped}
    for name, ftype in LLAMA_CPP_REQUANTISED.items():
        target = folder / f'{shipped.stem}-{ftype}.gguf'
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, ftype)
        params.allow_requantize = True
        with _quiet_stderr():  # llama.cpp prints a line per tensor
            failed = llama_cpp.llama_model_quantize(str(shipped).encode(), str(target).encode(), ctypes.byref(params))
        if failed:
            raise RuntimeError(f'llama.cpp could not write {target}')
        models[name] = target
    return models


def turns(names: list[str], round_: int) -> list[str]:
    """The order the contenders run in round `round_`: as listed, reversed every other round, so that no contender
    always runs right after the same one (a run leaves the caches and the memory controller to the next)."""
    return names if round_ % 2 == 0 else names[::-1]


def measure(threads: Sequence[int], repeats: int, new_tokens: int, prompts: int, agreement_tokens: int,
            cache_dir) -> dict:
    import torch

    from mm_llm_ros.core.llm.prompt import PromptBuilder

    model, tokenizer = _merged_smollm2(cache_dir)
    builder = PromptBuilder()
    long_prompt = builder.encode(tokenizer, INSTRUCTIONS[0], CONTEXT)
    capacity = 1024  # the node's generation.context_length
    decoders = _decoders(model, capacity)
    bytes_per_step = step_bytes(model)
    speed: dict[tuple[int, str], list[tuple[float, float]]] = {}
    bandwidth: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix='bench-cpu-') as folder:
        ggufs = llama_cpp_models(pathlib.Path(folder))
        no_repack = [name for name, path in ggufs.items() if not repacking_runs(path)]
        bytes_per_step.update({name: path.stat().st_size for name, path in ggufs.items()})  # tied head: all read
        for count in threads:
            torch.set_num_threads(count)
            bandwidth[count] = read_bandwidth()
            contenders = dict(decoders)
            contenders.update({name: LlamaCppDecoder(path, count, capacity, repack=name not in no_repack)
                               for name, path in ggufs.items()})
            for name, decoder in contenders.items():
                _run(decoder, long_prompt, 8)  # warm-up
                speed[(count, name)] = []
            for round_ in range(repeats):
                for name in turns(list(contenders), round_):
                    ttft, rate, _ = _run(contenders[name], long_prompt, new_tokens)
                    speed[(count, name)].append((ttft, rate))
        torch.set_num_threads(max(threads))
        reference, fast = decoders['fp32 (llm.quantization none)'], decoders['int8 (llm.quantization int8)']
        row_major = decoders['fp32, lean step, row-major weights']
        llama_f32 = LlamaCppDecoder(ggufs['llama.cpp F32'], max(threads), capacity,
                                    repack='llama.cpp F32' not in no_repack) if ggufs else None
        first_divergent, identical, layout_identical, llama_identical = [], 0, 0, 0
        for instruction in (INSTRUCTIONS * 2)[:prompts]:
            ids = builder.encode(tokenizer, instruction)
            tokens = [_run(decoder, ids, agreement_tokens)[2] for decoder in (reference, fast)]
            identical += tokens[0] == tokens[1]
            layout_identical += _run(row_major, ids, agreement_tokens)[2] == tokens[0]
            first_divergent.append(next((i for i, (a, b) in enumerate(zip(*tokens)) if a != b), agreement_tokens))
            if llama_f32 is not None:
                llama_identical += _run(llama_f32, ids, agreement_tokens)[2] == tokens[0]
    return {'speed': speed, 'bandwidth': bandwidth, 'bytes': bytes_per_step, 'prompt_tokens': len(long_prompt),
            'llama_cpp': list(ggufs), 'llama_cpp_no_repack': no_repack, 'llama_f32_identical': llama_identical,
            'first_divergent': first_divergent, 'identical': identical, 'layout_identical': layout_identical,
            'names': list(decoders)}


def _before_issue_18(decoder) -> None:
    """Make a static decoder decode as before issue 18: the whole cache masked, no prompt-prefix reuse."""
    decoder._step_fn = decoder._decode_step
    decoder._reusable = lambda *_args: 0


def _row_major(model) -> None:
    """Undo `store_column_major`: every parameter contiguous again, as loaded."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.contiguous()


def answer_latency(questions: int, data_dir: pathlib.Path) -> dict[str, list[float]]:
    """Seconds per answer of the demo's llm_node configuration (`config/demo.yaml`) on the first `questions` items
    of the grounded benchmark, answered as `evaluate` answers them (the node's AskEngine, prompt and budget): before
    issue 18 (fp32), `none` now and `int8` now, taking turns per question."""
    from dataclasses import replace

    from mm_llm_ros.core.evaluation.grounded import load_grounded
    from mm_llm_ros.core.evaluation.model_predictor import ModelPredictor, ModelPredictorConfig
    from mm_llm_ros.core.llm.pipeline import build_answerer

    config = ModelPredictorConfig.from_params_file(REPO / 'mm_llm_ros' / 'config' / 'demo.yaml')
    modes = {'fp32 before issue 18': 'none', 'fp32 (none)': 'none', 'int8': 'int8'}
    predictors = {}
    for name, mode in modes.items():
        llm = replace(config.llm, model=replace(config.llm.model, quantization=mode))
        answerer = build_answerer(llm)
        if name.endswith('before issue 18'):
            _before_issue_18(answerer.decoder)
            _row_major(answerer.model)  # the weights as loaded, not as the lean step stores them now
        predictor = ModelPredictor(replace(config, llm=llm))
        predictor._answerer = lambda answerer=answerer: answerer  # this variant's own model and decoder
        predictors[name] = predictor
    seconds: dict[str, list[float]] = {name: [] for name in predictors}
    answers: dict[str, list[str]] = {name: [] for name in predictors}
    for item in load_grounded(data_dir)[:questions]:
        for name, predictor in predictors.items():
            start = time.perf_counter()
            answers[name].append(predictor.predict(item))
            seconds[name].append(time.perf_counter() - start)
    return {'seconds': seconds, 'answers': answers}


def latency_markdown(latency: dict) -> str:
    seconds, answers = latency['seconds'], latency['answers']
    before = statistics.median(seconds['fp32 before issue 18'])
    lines = ['', f'**Demo answer latency** (`config/demo.yaml`, the first {len(seconds["int8"])} grounded-benchmark '
             'questions answered as `evaluate` answers them, variants taking turns; the first question of each '
             'variant has no prompt prefix to reuse):', '',
             '| variant | median s per answer | mean s | vs before | answers equal to fp32 (none) |',
             '|---|---:|---:|---:|---:|']
    for name, values in seconds.items():
        same = sum(a == b for a, b in zip(answers[name], answers['fp32 (none)']))
        lines.append(f'| {name} | {statistics.median(values):.2f} | {statistics.mean(values):.2f} | '
                     f'{statistics.median(values) / before:.2f}x | {same}/{len(values)} |')
    return '\n'.join(lines + [''])


# The issue's own measurements (issue 18, llama-cpp-python 0.3.36 built from source, same SmolLM2 weights, 2-core
# machine of this type, 219-token prompt, 64 greedy tokens): (decode tok/s at 1 / 2 threads, TTFT ms at 1 / 2).
LLAMA_CPP_FROM_THE_ISSUE = {'llama.cpp Q4_1 (as shipped)': ((62, 98), (1417, 847)),
                            'llama.cpp Q8_0': ((96, 118), (614, 360)),
                            'llama.cpp F32': ((36, 46), (890, 454))}


HEAD_TO_HEAD = {'fp32 (llm.quantization none)': 'llama.cpp F32', 'int8 (llm.quantization int8)': 'llama.cpp Q8_0'}


def head_to_head(result: dict, threads: Sequence[int]) -> list[str]:
    """Markdown lines: per round, each of our paths' decode tokens/s over its llama.cpp counterpart's from the same
    round (the two ran a few seconds apart): the median ratio, its range, and the rounds ours was ahead. Medians of
    each side alone can cross over on a shared host where one side's slow round is the other's fast one."""
    lines = ['', '**Head to head, round by round** (decode tokens/s, ours over llama.cpp in the same round):', '',
             '| ours | llama.cpp | threads | median ratio | lowest | highest | rounds ours ahead |',
             '|---|---|---:|---:|---:|---:|---:|']
    for ours, theirs in HEAD_TO_HEAD.items():
        if (threads[0], theirs) not in result['speed']:
            continue
        shown = f'{theirs}, no repacking' if theirs in result.get('llama_cpp_no_repack', []) else theirs
        for count in threads:
            ratios = [a[1] / b[1] for a, b in zip(result['speed'][(count, ours)], result['speed'][(count, theirs)],
                                                  strict=True)]
            lines.append(f'| {ours} | {shown} | {count} | {statistics.median(ratios):.3f}x | {min(ratios):.3f}x | '
                         f'{max(ratios):.3f}x | {sum(r > 1 for r in ratios)} of {len(ratios)} |')
    return lines + ['']


def markdown(result: dict, threads: Sequence[int], repeats: int, new_tokens: int) -> str:
    import torch

    names = result['names']
    base = 'fp32, whole-cache attention (before issue 18)'

    def median(count, name, index):
        return statistics.median(sample[index] for sample in result['speed'][(count, name)])

    lines = [
        '# CPU decode speed of the embedded default (issue 18)', '',
        f'{platform.processor() or platform.machine()} ({os.cpu_count()} cores), torch '
        f'{torch.__version__}; SmolLM2-135M merged as served, greedy, static decoder with a 1024-slot cache; '
        f'{result["prompt_tokens"]}-token prompt, {new_tokens} tokens; median of {repeats} interleaved runs '
        '(wall clock; taking turns, the order reversed every other round, variants see the same machine load). '
        'Produced by `bench/cpu.py`.', '',
        '| variant | threads | decode tokens/s | vs before | TTFT (ms) | vs before | bandwidth limit (tokens/s) |',
        '|---|---:|---:|---:|---:|---:|---:|',
    ]
    llama_cpp = result.get('llama_cpp', [])
    for count in threads:
        for name in names + llama_cpp:
            rate, ttft = median(count, name, 1), median(count, name, 0)
            fmt = name if name in llama_cpp else 'int8' if name.startswith('int8') else 'fp32'
            limit = result['bandwidth'][count] * 1e9 / result['bytes'][fmt]
            shown = f'{name}, no repacking' if name in result.get('llama_cpp_no_repack', []) else name
            lines.append(f'| {shown} | {count} | {rate:.1f} | {rate / median(count, base, 1):.2f}x | '
                         f'{1000 * ttft:.0f} | {ttft / median(count, base, 0):.2f}x | {limit:.0f} |')
    lines += ['', 'Read bandwidth measured in this run: '
              + ', '.join(f'{result["bandwidth"][c]:.1f} GB/s at {c} thread(s)' for c in threads)
              + f'; bytes per decode step: fp32 {result["bytes"]["fp32"] / 1e6:.0f} MB, '
              f'int8 {result["bytes"]["int8"] / 1e6:.0f} MB (projections and lm_head)'
              + ('; llama.cpp: the GGUF file (its tied output matrix is read whole).' if llama_cpp else '.'), '']
    if llama_cpp:
        lines += head_to_head(result, threads)
        lines += [f'llama.cpp (llama-cpp-python, same run, same prompt ids, greedy on the host as ours): its F32 '
                  f'gave our fp32 greedy tokens on {result["llama_f32_identical"]} of '
                  f'{len(result["first_divergent"])} agreement prompts.']
        if result.get('llama_cpp_no_repack'):
            lines += ['', '"no repacking": with its default repacked weight buffers this llama.cpp build crashed on '
                      'that file here (a child process probes each file first), so it ran with `use_extra_bufts` '
                      'off. The repacked kernels are llama.cpp\'s faster path where they work.']
    else:
        lines += ['**llama.cpp, quoted from issue 18 (not this run; llama_cpp is not installed here):**', '',
                  '| contender | decode tokens/s 1 / 2 threads | TTFT ms 1 / 2 threads |', '|---|---:|---:|']
        for name, ((one, two), (ttft_one, ttft_two)) in LLAMA_CPP_FROM_THE_ISSUE.items():
            lines.append(f'| {name} | {one} / {two} | {ttft_one} / {ttft_two} |')
    divergent = sorted(result['first_divergent'])
    lines += ['', f'**Greedy agreement, int8 vs fp32** ({len(divergent)} prompts, '
              f'{max(divergent) if divergent else 0} tokens at most): {result["identical"]} identical continuations; '
              f'first divergent token median {statistics.median(divergent):.0f}, min {divergent[0]} '
              f'(per prompt: {", ".join(map(str, result["first_divergent"]))}).', '',
              f'**fp32 column-major vs row-major weights** (the same maps summed in another order): '
              f'{result["layout_identical"]} of {len(divergent)} continuations identical.', '']
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--new-tokens', type=int, default=64)
    parser.add_argument('--prompts', type=int, default=20)
    parser.add_argument('--agreement-tokens', type=int, default=32)
    parser.add_argument('--cache-dir', type=pathlib.Path, default=None)
    parser.add_argument('--answers', type=int, default=12,
                        help='grounded-benchmark questions for the demo answer latency (0: skip)')
    parser.add_argument('--data', type=pathlib.Path, default=REPO.parent / 'shared' / 'data',
                        help='sample-data folder of the grounded benchmark\'s real scenes')
    parser.add_argument('--out', type=pathlib.Path, default=REPO / 'bench' / 'results' / 'cpu.md')
    args = parser.parse_args(argv)
    from llm import write_markdown

    result = measure(args.threads, args.repeats, args.new_tokens, args.prompts, args.agreement_tokens,
                     args.cache_dir)
    text = markdown(result, args.threads, args.repeats, args.new_tokens)
    if args.answers:
        text += latency_markdown(answer_latency(args.answers, args.data))
    write_markdown(args.out, text)
    print(text)


if __name__ == '__main__':
    sys.path[:0] = [str(REPO / 'mm_llm_ros'), str(REPO / 'bench')]
    main()
