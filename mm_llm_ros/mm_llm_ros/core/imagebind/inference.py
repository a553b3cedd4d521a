"""Prepare the official ImageBind model for fast inference without changing its weights or its math.

The official code (untouched on disk) runs every trunk sequence-first: `EinOpsRearrange('b l d -> l b d')` before
the blocks and back after them, with `nn.MultiheadAttention(batch_first=False)` called with `need_weights=False`.
That already reaches `F.scaled_dot_product_attention` inside `F.multi_head_attention_forward`, with no mask for
vision, audio and depth (text passes its float causal mask), so flash/memory-efficient SDPA is eligible in fp16 on
CUDA. What it misses is torch's native MHA fast path (`torch._native_multi_head_attention`: one fused call for the
QKV projection, bias, scaling, SDPA and output projection instead of ~40 Python-level ops per block), which torch
takes only with `batch_first=True`, no `bias_k`/`bias_v` and no float mask. `prepare_for_inference` therefore:

1. sets eval mode and freezes the parameters (the fast path also needs no autograd: the encoder runs under
   `torch.inference_mode()`), and replaces the blocks' DropPath (the identity in eval mode) by `nn.Identity`,
2. on CUDA by default, runs the trunks that can take the fast path batch-first: the two rearranges become identities
   and each attention module gets `batch_first=True`; every other op of a block is per token, so the computation
   is the same. That is the vision trunk: audio, depth, thermal and IMU have `add_bias_kv=True` and text passes a
   float causal mask, so they keep the official layout and SDPA path. Not on CPU by default: there the fused
   kernel is no faster in fp32 and much slower in fp16 (tiny preset, one thread, vision batch 4: fp32 +5%,
   fp16 +48%),
3. if asked (`channels_last=True`), stores the patch-embedding conv weights channels-last, so cuDNN can pick its
   NHWC/NDHWC kernels. Off by default: it measured slower on the CPU (fp32, vision batch 4: +44% for the whole
   tiny model) and no faster on the H200 (the vision stem alone at batch 128: 4.85 ms against 4.60),
4. optionally compiles each transformer block with `torch.compile(dynamic=True)` (regional compilation: equal
   blocks share one compiled graph, so the 32 vision blocks compile once, and one dynamic-shape graph serves every
   batch size above 1: torch specialises size 1, so the first batch of 2 compiles once more, later ones never),
   checked by a warm-up forward; if compilation is impossible the blocks stay eager and the reason is logged.
   Measured on CPU (tiny, inductor): vision + audio + depth warm-up 11.5 s, 4 graphs; batch 8 then 0.7 s, 1 more.

On CUDA, `GraphedForward` then replays the whole forward as a CUDA graph, one per input signature (modalities and
shapes), captured on first use. At batch 1 ImageBind-huge is launch-bound, not compute-bound: its vision forward is
about 0.5 ms of matrix work on an H200 (335 GFLOP) but hundreds of kernels launched one by one from Python (32 blocks
of a dozen ops each); a graph launches them all in one call.

Outputs equal the official model's to float rounding (tests: fp32 to 1e-5, fp16 within fp16 rounding). Measured on
an H200 in fp16 (`bench/results/gpu.md`, ImageBind-huge, eager official vs prepared): vision batch 1 14.9 -> 12.7 ms,
batch 128 1085 -> 1303 images/s, audio 8.6 -> 6.9 ms, depth 7.9 -> 6.5 ms, embeddings' cosine 1.00000. Compiling
(step 4) was not measured there.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

_TO_SEQUENCE_FIRST = 'b l d -> l b d'
_TO_BATCH_FIRST = 'l b d -> b l d'


@dataclass
class InferenceSetup:
    """What `prepare_for_inference` applied, for logs and benchmarks."""
    batch_first_trunks: tuple[str, ...] = ()
    channels_last: bool = False
    compiled: bool = False
    compile_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f'batch-first trunks: {", ".join(self.batch_first_trunks) or "none"}',
                 f'channels-last stems: {"yes" if self.channels_last else "no"}',
                 f'compiled blocks: {f"yes ({self.compile_s:.1f} s)" if self.compiled else "no"}']
        return '; '.join(parts + self.notes)


def _is_rearrange(module: nn.Module, expression: str) -> bool:
    return getattr(module, 'rearrange_expr', None) == expression and not getattr(module, 'kwargs', None)


def _fast_path_eligible(model: nn.Module, name: str) -> bool:
    """Whether the attention of trunk `name` can take torch's fused MHA kernel (static conditions only)."""
    if getattr(model.modality_preprocessors[name], 'causal_masking', False):
        return False  # the text trunk gets a float causal mask, which the fast path refuses
    return all(isinstance(a, nn.MultiheadAttention) and a.bias_k is None and a.bias_v is None
               and not a.add_zero_attn and a._qkv_same_embed_dim
               for a in (block.attn for block in model.modality_trunks[name].blocks))


def _batch_first(trunk: nn.Module) -> bool:
    """Turn one official `SimpleTransformer` batch-first in place; False (untouched) if laid out unexpectedly."""
    pre, post = trunk.pre_transformer_layer, trunk.post_transformer_layer
    attentions = [block.attn for block in trunk.blocks]
    if isinstance(post, nn.Identity) and all(a.batch_first for a in attentions):
        return True  # prepared before
    if not (isinstance(pre, nn.Sequential) and len(pre) and _is_rearrange(pre[-1], _TO_SEQUENCE_FIRST)
            and _is_rearrange(post, _TO_BATCH_FIRST) and not any(a.batch_first for a in attentions)):
        return False
    pre[-1] = nn.Identity()
    trunk.post_transformer_layer = nn.Identity()
    for attention in attentions:
        attention.batch_first = True
    return True


def _identity_drop_path(model: nn.Module) -> None:
    """DropPath is the identity in eval mode; an `nn.Identity` also gives every block the same module types, so the
    compiled blocks do not recompile for each of them."""
    for block in _blocks(model):
        if not isinstance(getattr(block, 'drop_path', None), (nn.Identity, type(None))):
            block.drop_path = nn.Identity()


def _channels_last(model: nn.Module) -> int:
    """Store the conv stems' weights channels-last; returns how many convs were converted."""
    count = 0
    for module in model.modality_preprocessors.modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            fmt = torch.channels_last_3d if isinstance(module, nn.Conv3d) else torch.channels_last
            module.weight.data = module.weight.data.contiguous(memory_format=fmt)
            count += 1
    return count


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [block for trunk in model.modality_trunks.values() for block in trunk.blocks]


def _reason(exc: BaseException) -> str:
    """The root cause in one line (dynamo wraps compiler errors in BackendCompilerFailed.inner_exception)."""
    while (inner := exc.__cause__ or getattr(exc, 'inner_exception', None)) is not None:
        exc = inner
    text = str(exc).strip()
    return f'{type(exc).__name__}: {text.splitlines()[0]}' if text else type(exc).__name__


def _compile_blocks(model: nn.Module, warmup: Mapping[str, torch.Tensor], backend: str | Callable) -> tuple[bool, str]:
    """Compile every block in place and run `warmup` through the model; on failure undo it and return the reason."""
    if not torch._dynamo.is_dynamo_supported():
        version = '.'.join(map(str, sys.version_info[:2]))
        return False, f'torch.compile does not support Python {version} with torch {torch.__version__}'
    blocks = _blocks(model)
    for block in blocks:
        block.compile(backend=backend, dynamic=True)
    try:
        with torch.inference_mode():
            model(dict(warmup))
    except Exception as exc:  # noqa: BLE001 - any compiler failure (no C++ compiler, no triton, ...) means eager
        for block in blocks:
            block._compiled_call_impl = None  # the inverse of nn.Module.compile(), which sets exactly this
        return False, _reason(exc)
    return True, ''


def prepare_for_inference(model: nn.Module, *, batch_first: bool | None = None, channels_last: bool = False,
                          compile: bool = False, warmup: Mapping[str, torch.Tensor] | None = None,
                          compile_backend: str | Callable = 'inductor') -> InferenceSetup:
    """Set up `model` (the official `ImageBindModel`, already on its device and dtype) for inference, in place.

    `batch_first` None means: on CUDA only. `channels_last` is off by default: on the H200 the channels-last vision
    stem measured no faster (4.85 ms against 4.60 at batch 128). `compile` needs `warmup`, a batch of inputs (any
    modalities, on the model's device and dtype) whose forward triggers and checks the compilation.
    """
    model.eval().requires_grad_(False)
    _identity_drop_path(model)
    setup = InferenceSetup()
    on_cuda = next(model.parameters()).device.type == 'cuda'
    if batch_first if batch_first is not None else on_cuda:
        eligible = [name for name in model.modality_trunks if _fast_path_eligible(model, name)]
        setup.batch_first_trunks = tuple(name for name in eligible if _batch_first(model.modality_trunks[name]))
        skipped = sorted(set(eligible) - set(setup.batch_first_trunks))
        if skipped:
            setup.notes.append(f'left sequence-first (unexpected layout): {", ".join(skipped)}')
    if channels_last:
        setup.channels_last = _channels_last(model) > 0

    if compile:
        started = time.perf_counter()
        if not warmup:
            ok, reason = False, 'no warm-up inputs to check the compilation with'
        else:
            ok, reason = _compile_blocks(model, warmup, compile_backend)
        setup.compile_s = time.perf_counter() - started
        setup.compiled = ok
        if not ok:
            setup.notes.append(f'torch.compile fell back to eager: {reason}')
            logger.warning('ImageBind: torch.compile is not possible here, running eager (%s)', reason)
    logger.info('ImageBind inference setup: %s', setup.describe())
    return setup


@dataclass
class _CapturedForward:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]     # static input buffers, copied into before each replay
    outputs: dict[str, torch.Tensor]    # static output buffers, overwritten by each replay


class GraphedForward:
    """`model(inputs)` replayed as CUDA graphs: one per input signature (modality names, shapes, dtypes), captured on
    its first call after one eager warm-up forward, at most `max_graphs` kept (least recently used dropped).

    The graphs share one memory pool, which is safe because they never run concurrently (calls are serialised by a
    lock) and every graph's static buffers stay referenced. Outputs are copies, so a later replay cannot overwrite
    what a caller holds. If a capture fails (an op that cannot be captured, out of memory), this and every later
    call runs the model eagerly and `failure` says why: graphs are an optimisation, never a reason to stop encoding.
    """

    def __init__(self, model: nn.Module, max_graphs: int = 16) -> None:
        device = next(model.parameters()).device
        if device.type != 'cuda':
            raise ValueError(f'CUDA graphs need a model on a CUDA device, this one is on {device}')
        self.model = model
        self.max_graphs = max_graphs
        self.failure = ''
        self.captures = 0
        self._device = device
        self._graphs: OrderedDict[tuple, _CapturedForward] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle()
        self._lock = threading.Lock()

    @staticmethod
    def signature(inputs: Mapping[str, torch.Tensor]) -> tuple:
        return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))

    @property
    def graph_count(self) -> int:
        return len(self._graphs)

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            if self.failure:
                return self.model(dict(inputs))
            key = self.signature(inputs)
            captured = self._graphs.get(key)
            if captured is None:
                try:
                    captured = self._capture(inputs)
                except Exception as exc:  # noqa: BLE001 - any capture failure means eager, with the reason logged
                    self.failure = _reason(exc)
                    self._graphs.clear()
                    logger.warning('ImageBind: CUDA graph capture failed, running eager from now on (%s)', self.failure)
                    return self.model(dict(inputs))
                self._graphs[key] = captured
                while len(self._graphs) > self.max_graphs:
                    self._graphs.popitem(last=False)
            else:
                self._graphs.move_to_end(key)
            for name, tensor in inputs.items():
                captured.inputs[name].copy_(tensor, non_blocking=True)
            captured.graph.replay()
            return {name: out.clone() for name, out in captured.outputs.items()}

    def _capture(self, inputs: Mapping[str, torch.Tensor]) -> _CapturedForward:
        static = {name: tensor.detach().clone() for name, tensor in inputs.items()}
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handles, lazy inits, compiled code
            self.model(dict(static))
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA work of other threads (another node in this process) does not invalidate the capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode='thread_local'):
            outputs = self.model(dict(static))
        self.captures += 1
        return _CapturedForward(graph, static, dict(outputs))
