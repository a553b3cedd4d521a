"""The robot-GPU workload in one run: LLaMA-7B-shaped ImageBind-LLM decoding and ImageBind-huge encoding.

    python bench/gpu.py                        # on a GPU machine: fp16, about 5-8 minutes on an H100/H200
    .venv/bin/python bench/gpu.py --device cpu --smoke   # here: every code path on small shapes in about a minute

Imports only the ROS-free core (torch, transformers, torchao; ImageBind's official model code for its section), so
it runs on a bare CUDA Python with the few missing pure-Python packages carried as wheels (see docs/gpu.md).

What it measures, all in the same process and run:
- **ceilings**: device copy bandwidth (bytes read + written by a large device-to-device copy) and matrix throughput
  (a large product in the model dtype);
- **LLM** (random weights in the LLaMA-7B shape; `--smoke`: 2 layers of width 256): for the bare backbone, the
  served ImageBind-LLM (adapters merged, random non-zero adapter values, one visual feature set) and Hugging Face
  `generate()` on the same backbone: TTFT for 100- and 400-token prompts, batch-1 greedy decode tokens/s over
  `--new-tokens`, per decoder (`eager`: the transformers forward with its dynamic cache; `cuda_graph`: static KV
  cache + the decode step replayed as a CUDA graph; `compile`: the same step through torch.compile first) and per
  weight format (fp16, int8, int4 weight-only), with peak GPU memory, and the bandwidth limit of each row: weight
  bytes read per token / copy bandwidth;
- **greedy agreement** of the fast decoders with the eager one (tiny fp32 model: identical; 7B fp16: reported);
- **ImageBind-huge** (random weights): `bench/imagebind_gpu.py`;
- **goals** of the GPU issue, each met or not, computed from the tables above.

`--int4-kernels tinygemm,fbgemm,gemlite` adds one set of int4 rows per kernel (a freshly quantised model each; a
kernel whose package does not import or whose probe fails gets one row saying why). `--skip-eager` leaves out the
eager and bare-backbone reference rows (only the served model on the fast decoders: a short device call).

Rows that fail (an unsupported kernel, out of memory) are reported with their error; `--budget-s` skips what is
left once the time is spent, so a slow machine still writes a table. The Markdown is rewritten after each section.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import pathlib
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / 'mm_llm_ros'), str(REPO / 'bench')]  # the source tree and the sibling benches

import torch  # noqa: E402

from llm import _injected, llama7b_shape_backbone, write_markdown  # noqa: E402  (bench/llm.py)
from mm_llm_ros.core.llm.decoding import StaticDecoder  # noqa: E402
from mm_llm_ros.core.llm.generation import GenerationConfig, generate  # noqa: E402

# LLaMA-7B (published shape) and the CPU smoke stand-in.
SHAPES = {'llama7b': {'layers': 32, 'hidden': 4096, 'intermediate': 11008, 'heads': 32},
          'smoke': {'layers': 2, 'hidden': 256, 'intermediate': 688, 'heads': 4}}
PROMPT_LENGTHS = (100, 400)
CONTEXT_LENGTH = 512  # the official max_seq_len and the node's default: the static cache's size
WEIGHT_NAMES = {'none': 'fp16', 'int8': 'int8', 'int4': 'int4'}
SECTIONS = ('ceilings', 'agreement', 'imagebind', 'llm')


@dataclass
class LLMRow:
    model: str
    weights: str
    decoder: str
    ttft_ms: dict[int, float] = field(default_factory=dict)
    tokens_per_s: float = float('nan')
    weight_bytes_per_token: int = 0
    peak_gib: float = float('nan')
    tokens: list[int] = field(default_factory=list)
    note: str = ''


@dataclass
class Ceilings:
    copy_gb_s: float
    matmul_tflops: float


@dataclass
class Report:
    header: list[str]
    ceilings: Ceilings | None = None
    llm: list[LLMRow] = field(default_factory=list)
    agreement: list[str] = field(default_factory=list)
    imagebind: str = ''
    imagebind_values: dict = field(default_factory=dict)
    device_type: str = 'cuda'


# ---- timing helpers ----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call, with the device synchronised around each call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _copy_bandwidth(device: torch.device, dtype: torch.dtype, elements: int, repeats: int) -> float:
    source = torch.randn(elements, device=device, dtype=dtype)
    target = torch.empty_like(source)
    seconds = _timed(device, lambda: target.copy_(source), repeats)
    return 2 * source.numel() * source.element_size() / seconds / 1e9


def measure_ceilings(device: torch.device, dtype: torch.dtype, smoke: bool) -> Ceilings:
    """Copy bandwidth (read + write bytes / s) and matrix throughput in `dtype`, measured here and now."""
    copy_gb_s = _copy_bandwidth(device, dtype, (1 << 24) if smoke else (1 << 30), 5 if smoke else 20)  # 2 GiB fp16
    n = 1024 if smoke else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul_s = _timed(device, lambda: a @ b, 3 if smoke else 20)
    return Ceilings(copy_gb_s, 2 * n ** 3 / matmul_s / 1e12)


# ---- LLM ---------------------------------------------------------------------------------------------------------
def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter and buffer of the decoder layers, the final norm
    and lm_head (the embedding table contributes one row). The bind network runs once per query: not counted."""
    from mm_llm_ros.core.llm.quantization import tensor_bytes

    base = model.model
    modules = [base.layers, base.norm, model.lm_head]
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor_bytes(tensor)
    embedding = base.embed_tokens.weight
    return total + embedding.shape[1] * embedding.element_size()


def _prompt(length: int, bos: int) -> list[int]:
    generator = torch.Generator().manual_seed(length)
    return [bos] + torch.randint(32, 127, (length - 1,), generator=generator).tolist()  # printable bytes


def _greedy(new_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, stop_on_eos=False,
                            context_length=CONTEXT_LENGTH)


def time_our_loop(model, tokenizer, decoder: StaticDecoder | None, device: torch.device, repeats: int,
                  new_tokens: int, row: LLMRow) -> None:
    """TTFT per prompt length and decode tokens/s (median over repeats) through `generation.generate`."""
    for length in PROMPT_LENGTHS:
        prompt = _prompt(length, tokenizer.bos_id)
        budget = new_tokens if length == PROMPT_LENGTHS[0] else 1
        results = [generate(model, tokenizer, prompt, _greedy(budget), decoder=decoder) for _ in range(repeats + 1)]
        row.ttft_ms[length] = 1000 * statistics.median(r.time_to_first_token_s for r in results[1:])
        if budget > 1:
            row.tokens_per_s = statistics.median(r.tokens_per_s for r in results[1:])
            row.tokens = results[-1].token_ids


def time_hf_generate(model, tokenizer, device: torch.device, repeats: int, new_tokens: int, row: LLMRow) -> None:
    """Hugging Face `generate()` (greedy, its default dynamic cache): TTFT = a 1-token call, decode from the rest."""
    def run(prompt: list[int], count: int) -> list[int]:
        ids = torch.tensor([prompt], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                             min_new_tokens=count, do_sample=False, pad_token_id=tokenizer.eos_id)
        return out[0, len(prompt):].tolist()

    for length in PROMPT_LENGTHS:
        prompt = _prompt(length, tokenizer.bos_id)
        row.ttft_ms[length] = 1000 * _timed(device, lambda: run(prompt, 1), repeats)
    prompt = _prompt(PROMPT_LENGTHS[0], tokenizer.bos_id)
    total = _timed(device, lambda: run(prompt, new_tokens), repeats)
    row.tokens_per_s = (new_tokens - 1) / (total - row.ttft_ms[PROMPT_LENGTHS[0]] / 1000)
    row.tokens = run(prompt, new_tokens)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else float('nan')


def _reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _fast_modes(device: torch.device) -> tuple[str, ...]:
    return ('cuda_graph',) if device.type == 'cuda' else ('static',)


class Budget:
    """Skips work once `seconds` have passed since the start of the run."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    @property
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def spent(self) -> bool:
        return self.remaining < 0


COMPILE_MIN_S = 110.0  # a LLaMA-7B decode step compiles in about a minute or two: not started with less left


def _run_row(rows: list[LLMRow], row: LLMRow, budget: Budget, device: torch.device,
             measure: Callable[[LLMRow], None], log: Callable[[str], None]) -> None:
    """Append `row` and fill it with `measure(row)`, unless the budget is spent; a failure becomes its note."""
    rows.append(row)
    if budget.spent:
        row.note = 'skipped: time budget spent'
        return
    _reset_peak(device)
    start = time.perf_counter()
    try:
        measure(row)
    except Exception as exc:  # one unsupported kernel or an OOM must not lose the rest of the table
        row.note = f'failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}'
        traceback.print_exc()
    row.peak_gib = _peak_gib(device)
    log(f'{row.model} {row.weights} {row.decoder}: {row.tokens_per_s:.1f} tok/s, TTFT {row.ttft_ms} '
        f'({time.perf_counter() - start:.1f} s) {row.note}')


def _our_loop(model, tokenizer, decoder_mode: str, device: torch.device, repeats: int,
              new_tokens: int) -> Callable[[LLMRow], None]:
    def measure(row: LLMRow) -> None:
        decoder = None if decoder_mode == 'eager' else fresh_prompt_decoder(model, decoder_mode)
        time_our_loop(model, tokenizer, decoder, device, repeats, new_tokens, row)
    return measure


def fresh_prompt_decoder(model, decoder_mode: str) -> StaticDecoder:
    """A static-cache decoder that prefills every prompt whole: the timed runs repeat one prompt, and with prefix
    reuse (the node's default) TTFT would time a one-token prefill."""
    return StaticDecoder(model, CONTEXT_LENGTH, decoder_mode, reuse_prefix=False)


def parse_int4_kernels(text: str) -> list[str]:
    """'tinygemm,fbgemm' -> ['tinygemm', 'fbgemm'] (argparse type); an unknown name is an argument error."""
    from mm_llm_ros.core.llm.quantization import INT4_KERNEL_NAMES

    kernels = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in kernels if name not in INT4_KERNEL_NAMES]
    if unknown or not kernels:
        raise argparse.ArgumentTypeError(f"unknown int4 kernel(s) {', '.join(unknown) or '(none given)'}: "
                                         f"choose from {', '.join(INT4_KERNEL_NAMES)}")
    return list(dict.fromkeys(kernels))


def _formats(modes: Sequence[str], int4_kernels: Sequence[str]) -> list[tuple[str, str]]:
    """(mode, int4 kernel) per freshly built model: int4 once per kernel, in the order given."""
    return [(mode, kernel) for mode in modes for kernel in (int4_kernels if mode == 'int4' else ('tinygemm',))]


def measure_llm(device: torch.device, dtype: torch.dtype, shape: dict, modes: Sequence[str], repeats: int,
                new_tokens: int, compile_modes: Sequence[str], budget: Budget, log: Callable[[str], None],
                rows: list[LLMRow], int4_group: int | None = None, int4_kernels: Sequence[str] = ('tinygemm',),
                skip_eager: bool = False, compile_min_s: float | None = None) -> list[LLMRow]:
    """Every (model, weights, decoder) row, appended to `rows` as measured (`log` is called after each); one
    freshly built backbone per weight format and int4 kernel (same seed, same weights)."""
    from mm_llm_ros.core.llm.quantization import check_quantization, model_dtype, quantize_linear_weights

    compile_min_s = COMPILE_MIN_S if compile_min_s is None else compile_min_s
    eager = () if skip_eager else ('eager',)
    for mode, kernel in _formats(modes, int4_kernels):
        # int4 loads the model in bfloat16, as the node does with dtype auto: tinygemm's only activation dtype.
        mode_dtype = model_dtype(mode, 'auto', dtype)
        weights = WEIGHT_NAMES[mode] if dtype == torch.float16 or mode != 'none' else str(dtype).split('.')[-1]
        if mode_dtype != dtype:
            weights += ' ' + {torch.bfloat16: 'bf16'}.get(mode_dtype, str(mode_dtype).split('.')[-1])
        if kernel != 'tinygemm':
            weights += f' {kernel}'  # the tinygemm rows keep their old label (and the goal that reads it)
        if budget.spent:
            rows.append(LLMRow('imagebind-llm merged', weights, '-', note='skipped: time budget spent'))
            continue
        try:  # a kernel whose package is missing or whose probe layer fails: one row saying why, then go on
            check_quantization(mode, device, mode_dtype, int4_kernel=kernel)
        except Exception as exc:
            rows.append(LLMRow('imagebind-llm merged', weights, '-',
                               note=f'refused: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}'))
            log(f'{weights}: {rows[-1].note}')
            continue
        _free(device)
        backbone = llama7b_shape_backbone(device, mode_dtype, **shape)
        tokenizer = backbone.tokenizer
        if mode == 'none' and not skip_eager:  # the references: the bare backbone, eager and fast, and HF
            plain = backbone.model
            per_token = weight_bytes_per_token(plain)
            # No compiled backbone row: the injection overhead is compared on the CUDA graph, saving a compile.
            for name in ('eager',) + _fast_modes(device):
                _run_row(rows, LLMRow('backbone', weights, name, weight_bytes_per_token=per_token), budget, device,
                         _our_loop(plain, tokenizer, name, device, repeats, new_tokens), log)
            _run_row(rows, LLMRow('backbone', weights, 'HF generate()', weight_bytes_per_token=per_token), budget,
                     device, lambda row: time_hf_generate(plain, tokenizer, device, repeats, new_tokens, row), log)
        model, _ = _injected(backbone, merge=True)  # patches the backbone in place: merged ImageBind-LLM
        served = model.backbone
        try:
            if mode != 'none':
                quantize_linear_weights(served, mode, int4_group_size=int4_group, int4_kernel=kernel)
            per_token = weight_bytes_per_token(served)
        except Exception as exc:  # e.g. a kernel that took the probe layer but not a 7B-shaped one
            traceback.print_exc()
            rows.append(LLMRow('imagebind-llm merged', weights, '-', note=f'failed to quantise: '
                               f'{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ""}'))
            log(f'{weights}: {rows[-1].note}')
            del model, served, backbone
            plain = None
            _free(device)
            continue
        for name in eager + _fast_modes(device) + (('compile',) if mode in compile_modes else ()):
            row = LLMRow('imagebind-llm merged', weights, name, weight_bytes_per_token=per_token)
            if name == 'compile' and 0 < budget.remaining < compile_min_s:
                rows.append(row)
                row.note = f'skipped: less than {compile_min_s:.0f} s of the time budget left to compile'
                continue
            _run_row(rows, row, budget, device, _our_loop(served, tokenizer, name, device, repeats, new_tokens), log)
        del model, served, backbone
        plain = None  # the fp16 backbone of the reference rows must not stay alive under the next format's rows
        _free(device)
    return rows


def tiny_agreement(device: torch.device) -> list[str]:
    """Tiny fp32 merged ImageBind-LLM on `device`: the fast decoders must give exactly the eager greedy tokens."""
    from mm_llm_ros.core.llm.backbones import tiny_random_backbone

    backbone = tiny_random_backbone(seed=0)
    backbone.model.to(device)
    model, _ = _injected(backbone, merge=True)
    prompt = _prompt(100, backbone.tokenizer.bos_id)
    config = _greedy(64)
    eager = generate(model.backbone, backbone.tokenizer, prompt, config).token_ids
    lines = []
    for mode in _fast_modes(device):
        fast = generate(model.backbone, backbone.tokenizer, prompt, config,
                        decoder=StaticDecoder(model.backbone, CONTEXT_LENGTH, mode)).token_ids
        lines.append(f'- tiny merged ImageBind-LLM, float32 on {device.type}: `{mode}` vs `eager`, 64 greedy tokens: '
                     + ('**identical**' if fast == eager else f'DIFFERENT from token {_first_difference(fast, eager)}'))
    return lines


def row_agreement(rows: list[LLMRow]) -> list[str]:
    """Each timed row's greedy tokens against the eager row of the same model and weights."""
    reference = {(r.weights, r.model): r.tokens for r in rows if r.decoder == 'eager' and r.tokens}
    lines = []
    for row in rows:
        base = reference.get((row.weights, row.model))
        if row.decoder != 'eager' and row.tokens and base:
            same = sum(a == b for a, b in zip(row.tokens, base))
            first = _first_difference(row.tokens, base)
            lines.append(f'- {row.model} {row.weights}: `{row.decoder}` vs `eager`: {same}/{len(base)} greedy tokens '
                         f'equal' + ('' if first is None else f', first difference at token {first}'))
    # Quantised rows against the fp16 (or the run's float) row of the same model and decoder.
    fp = {(r.model, r.decoder): r.tokens for r in rows if r.tokens and not r.weights.startswith(('int4', 'int8'))}
    for row in rows:
        base = fp.get((row.model, row.decoder))
        if row.weights.startswith(('int4', 'int8')) and row.tokens and base:
            same = sum(a == b for a, b in zip(row.tokens, base))
            first = _first_difference(row.tokens, base)
            lines.append(f'- {row.model} {row.weights}: `{row.decoder}` vs the unquantised `{row.decoder}`: '
                         f'{same}/{len(base)} greedy tokens equal'
                         + ('' if first is None else f', first difference at token {first}'))
    return lines


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


# ---- report ------------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> list[str]:
    import transformers

    try:
        import torchao
        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = 'not installed'
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        try:
            driver = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                    capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = 'unknown'
        where = (f'{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), '
                 f'driver {driver}, CUDA {torch.version.cuda}')
    else:
        where = f'CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads'
    return [f'{where}; torch {torch.__version__}, transformers {transformers.__version__}, torchao {torchao_version}, '
            f'Python {platform.python_version()}.']


def _fmt(value: float, digits: int = 1) -> str:
    return '-' if value != value else f'{value:.{digits}f}'


def llm_table(report: Report) -> list[str]:
    copy = report.ceilings.copy_gb_s if report.ceilings else float('nan')
    lines = ['| model | weights | decoder | TTFT 100 tok (ms) | TTFT 400 tok (ms) | decode tok/s | '
             'weight MB read/token | limit tok/s (copy bw) | % of limit | peak memory (GiB) | note |',
             '|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
    for row in report.llm:
        limit = copy * 1e9 / row.weight_bytes_per_token if row.weight_bytes_per_token else float('nan')
        lines.append(f'| {row.model} | {row.weights} | {row.decoder} | {_fmt(row.ttft_ms.get(100, float("nan")))} | '
                     f'{_fmt(row.ttft_ms.get(400, float("nan")))} | {_fmt(row.tokens_per_s)} | '
                     f'{_fmt(row.weight_bytes_per_token / 1e6, 0)} | {_fmt(limit, 0)} | '
                     f'{_fmt(100 * row.tokens_per_s / limit, 0)} | {_fmt(row.peak_gib)} | {row.note} |')
    return lines


def _find(rows: list[LLMRow], model: str, weights: str, decoder: str) -> LLMRow | None:
    """The measured row; `weights` matches the format whatever the activation dtype ('int4' finds 'int4 bf16')."""
    return next((r for r in rows if (r.model, r.weights.split()[0], r.decoder) == (model, weights, decoder)
                 and r.tokens_per_s == r.tokens_per_s), None)


def goals(report: Report) -> list[str]:
    """The GPU issue's goals, each with its measured value and verdict (on a GPU run)."""
    rows = report.llm
    # The served decoder: auto's compile where it was measured, else the CUDA graph; int4 compared on the same one.
    fast = 'compile' if _find(rows, 'imagebind-llm merged', 'fp16', 'compile') else 'cuda_graph'
    served = _find(rows, 'imagebind-llm merged', 'fp16', fast)
    hf = _find(rows, 'backbone', 'fp16', 'HF generate()')
    # Every measured int4 row on that decoder, one per kernel ('int4 bf16' is tinygemm, 'int4 bf16 fbgemm' ...).
    int4_rows = [r for r in rows if r.model == 'imagebind-llm merged' and r.decoder == fast
                 and r.weights.split()[0] == 'int4' and r.tokens_per_s == r.tokens_per_s]
    copy = report.ceilings.copy_gb_s if report.ceilings else float('nan')
    if report.device_type != 'cuda':
        return ['The goals are for an H100/H200-class GPU: a CPU run only shows that every path works.']
    lines = ['| goal | measured | verdict |', '|---|---|---|']

    def add(goal: str, value: float | None, target: float, text: str, higher_is_better: bool = True) -> None:
        if value is None or value != value:
            lines.append(f'| {goal} | not measured | - |')
            return
        met = value >= target if higher_is_better else value <= target
        ratio = value / target
        lines.append(f'| {goal} | {text} | {"met" if met else "not met"} ({ratio:.2f}x the target) |')

    if served:
        limit = copy * 1e9 / served.weight_bytes_per_token
        add('fp16 decode, batch 1 >= 60% of the bandwidth limit', served.tokens_per_s / limit, 0.6,
            f'{served.tokens_per_s:.0f} tok/s = {100 * served.tokens_per_s / limit:.0f}% of {limit:.0f}')
        add('TTFT for a 100-token prompt <= 50 ms', served.ttft_ms.get(100), 50.0,
            f'{served.ttft_ms.get(100, float("nan")):.1f} ms', higher_is_better=False)
    for row in int4_rows if served else []:
        kernel = row.weights.split()[2] if len(row.weights.split()) > 2 else ''
        add('int4 decode >= 1.8x fp16' + (f' ({kernel})' if kernel else ''),
            row.tokens_per_s / served.tokens_per_s, 1.8,
            f'{row.tokens_per_s:.0f} / {served.tokens_per_s:.0f} tok/s = '
            f'{row.tokens_per_s / served.tokens_per_s:.2f}x (`{row.decoder}`)')
    # Injection overhead: served vs bare backbone on the same decoder (compile if both have it, else the graph).
    pair = next(((m, b) for d in (fast, 'cuda_graph') if (m := _find(rows, 'imagebind-llm merged', 'fp16', d))
                 and (b := _find(rows, 'backbone', 'fp16', d))), None)
    if pair:
        merged, bare = pair
        overhead = bare.tokens_per_s / merged.tokens_per_s - 1
        add('ImageBind-LLM injection overhead <= 5% per token', overhead, 0.05,
            f'{100 * overhead:+.1f}% ({merged.tokens_per_s:.0f} vs {bare.tokens_per_s:.0f} tok/s, `{merged.decoder}`)',
            higher_is_better=False)
    if served and hf:
        add('fast path >= 2x Hugging Face generate()', served.tokens_per_s / hf.tokens_per_s, 2.0,
            f'{served.tokens_per_s:.0f} vs {hf.tokens_per_s:.0f} tok/s = {served.tokens_per_s / hf.tokens_per_s:.2f}x')
    values = report.imagebind_values
    if 'vision_batch1_ms' in values:
        add('ImageBind-huge fp16 vision batch 1 <= 10 ms', values['vision_batch1_ms'], 10.0,
            f"{values['vision_batch1_ms']:.2f} ms", higher_is_better=False)
    if 'vision_images_per_s' in values:
        add('ImageBind-huge fp16 vision batched >= 1000 images/s', values['vision_images_per_s'], 1000.0,
            f"{values['vision_images_per_s']:.0f} images/s")
    return lines


def markdown(report: Report, args: argparse.Namespace) -> str:
    lines = ['# The robot-GPU workload (`bench/gpu.py`)', '']
    lines += report.header
    lines += ['', f'Command: `python bench/gpu.py {" ".join(args.argv)}`. Greedy decoding of {args.new_tokens} tokens '
              f'after a 100-token prompt (EOS ignored), median of {args.repeats} runs after one warm-up; TTFT = '
              f'prefill + first token. Static KV cache of {CONTEXT_LENGTH} positions.', '']
    if report.ceilings:
        c = report.ceilings
        lines += ['## Ceilings measured in this run', '',
                  f'- copy bandwidth: **{c.copy_gb_s:.0f} GB/s** (bytes read + written by a device-to-device copy)',
                  f'- matrix throughput: **{c.matmul_tflops:.1f} TFLOP/s** ({args.dtype_name} product)', '']
    if report.llm:
        lines += ['## ImageBind-LLM decoding (LLaMA-7B shape, random weights)' if not args.smoke
                  else '## ImageBind-LLM decoding (smoke shape: 2 layers, width 256)', '']
        lines += llm_table(report)
        lines += ['', '"limit tok/s" is the copy bandwidth divided by the weight bytes one decode step reads (decoder '
                  'layers, final norm, lm_head; the bind network runs once per query). `backbone` is the plain '
                  'LLaMA; `imagebind-llm merged` is what `llm_node` serves (LoRA and biases folded, visual vector '
                  'in the o_proj bias).', '']
    agreement = report.agreement + row_agreement(report.llm)
    if agreement:
        lines += ['## Greedy tokens: fast decoders vs eager', ''] + agreement + ['']
    if report.imagebind:
        lines += [report.imagebind, '']
    lines += ['## Goals of the GPU issue', ''] + goals(report) + ['']
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', help='cuda, cuda:N or cpu')
    parser.add_argument('--smoke', action='store_true', help='small shapes, few repeats: every code path quickly')
    parser.add_argument('--sections', nargs='+', default=list(SECTIONS), choices=SECTIONS,
                        help='what to run; always in the order ' + ', '.join(SECTIONS))
    parser.add_argument('--imagebind-compile', action='store_true',
                        help='also time ImageBind with torch.compile (about 30-60 s more on a GPU)')
    parser.add_argument('--quantization', nargs='+', default=['none', 'int4', 'int8'],
                        choices=['none', 'int8', 'int4'], help='weight formats, measured in this order')
    parser.add_argument('--compile', nargs='*', default=['none', 'int4', 'int8'], choices=['none', 'int8', 'int4'],
                        help="weight formats that also get 'compile' decoder rows (the node's CUDA default; about "
                             'a minute of compiling each on a GPU)')
    parser.add_argument('--int4-group-size', type=int, default=None, choices=(32, 64, 128, 256),
                        help='int4 group size (default: 128, as the node)')
    parser.add_argument('--int4-kernels', type=parse_int4_kernels, default=['tinygemm'],
                        help='comma-separated int4 kernels, one set of int4 rows each: tinygemm (default), fbgemm '
                             "(torchao's preshuffled packing on fbgemm-gpu-genai), gemlite (Triton); a kernel that "
                             'does not import or run gets a row saying why')
    parser.add_argument('--skip-eager', action='store_true',
                        help='only the served model on the fast decoders: no eager, bare-backbone or HF rows')
    parser.add_argument('--compile-min-s', type=float, default=COMPILE_MIN_S,
                        help='do not start compiling a row with less than this much of the time budget left')
    parser.add_argument('--inductor-tuning', action='store_true',
                        help="compile with inductor's coordinate-descent tuning (gpt-fast's and torchao's setting)")
    parser.add_argument('--repeats', type=int, default=None, help='timed runs per row (default 3; smoke 1)')
    parser.add_argument('--new-tokens', type=int, default=None, help='decoded tokens (default 64; smoke 8)')
    parser.add_argument('--budget-s', type=float, default=400.0, help='skip the remaining rows after this long')
    parser.add_argument('--out', type=pathlib.Path, default=None,
                        help='default: bench/results/gpu.md (gpu-smoke.md with --smoke)')
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    args.new_tokens = args.new_tokens or (8 if args.smoke else 64)
    out = args.out or REPO / 'bench' / 'results' / ('gpu-smoke.md' if args.smoke else 'gpu.md')

    from mm_llm_ros.core.device import resolve_device

    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == 'cuda' else torch.float32
    args.dtype_name = str(dtype).split('.')[-1]
    if args.inductor_tuning:
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
        inductor_config.coordinate_descent_check_all_directions = True
    budget = Budget(args.budget_s)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f'[{time.perf_counter() - started:6.1f} s] {message}', flush=True)

    report = Report(header=environment(device), device_type=device.type)

    def log_and_write(message: str) -> None:  # after each LLM row: a run cut short still leaves its table
        log(message)
        write_markdown(out, markdown(report, args))

    shape = SHAPES['smoke' if args.smoke else 'llama7b']
    # Cheap and essential first: the LLM section ends with the slowest row (compiling), under the time budget.
    steps: dict[str, Callable[[], None]] = {
        'ceilings': lambda: setattr(report, 'ceilings', measure_ceilings(device, dtype, args.smoke)),
        'agreement': lambda: report.agreement.extend(tiny_agreement(device)),
        'imagebind': lambda: _imagebind(report, device, args.smoke, args.imagebind_compile),
        'llm': lambda: measure_llm(device, dtype, shape, args.quantization, args.repeats, args.new_tokens,
                                   args.compile, budget, log_and_write, report.llm, args.int4_group_size,
                                   args.int4_kernels, args.skip_eager, args.compile_min_s),
    }
    for name, step in steps.items():
        if name not in args.sections:
            continue
        log(f'section {name}')
        try:
            step()
        except Exception as exc:
            traceback.print_exc()
            report.header.append(f'Section `{name}` failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}')
        write_markdown(out, markdown(report, args))
    log(f'done in {time.perf_counter() - started:.0f} s; wrote {out}')
    print(markdown(report, args))


def _imagebind(report: Report, device: torch.device, smoke: bool, compile: bool) -> None:
    from imagebind_gpu import imagebind_results  # bench/imagebind_gpu.py

    dtype = torch.float16 if device.type == 'cuda' else torch.float32
    report.imagebind, report.imagebind_values = imagebind_results(device, dtype, smoke, compile and not smoke)


if __name__ == '__main__':
    with contextlib.suppress(KeyboardInterrupt):
        main()
