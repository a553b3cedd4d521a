"""Loading the published weights: a LLaMA backbone (Meta or Hugging Face format) and the ImageBind-LLM adapter.

Formats:

- **Meta LLaMA** directory: `consolidated.NN.pth` shards + `params.json`, and `tokenizer.model` beside them or one
  level up (the official layout is `<llama_dir>/7B/...` + `<llama_dir>/tokenizer.model`). Converted to a
  transformers `LlamaForCausalLM`: Meta's RoPE rotates interleaved pairs (x0, x1), (x2, x3)... while transformers
  rotates halves (x_i, x_{i+hd/2}), so the rows of wq and wk (and of anything that produces q or k) are permuted
  per head, `w.view(heads, hd/2, 2, -1).transpose(1, 2)`.
- **Hugging Face LLaMA** directory (`config.json` with model_type llama, safetensors preferred) + its tokenizer.
- **ImageBind-LLM adapter** (`7B.pth` = `{'model': state_dict}`, official key names; a 'config' entry is ignored).

Every file is read by `core/weights.py` (`torch.load(weights_only=True)`, memory-mapped, or safetensors), so a
pickle that carries code is refused. Problems raise `CheckpointError` naming the file and the keys or shapes.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mm_llm_ros.core.errors import CheckpointError
from mm_llm_ros.core.weights import listing, load_weights, tensor_state_dict

from .model import ImageBindLLM, ImageBindLLMConfig
from .tokenizer import HFTokenizer, SentencePieceTokenizer, TextTokenizer, TokenizerError

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Meta module name -> transformers module name, inside `layers.N.` / `model.layers.N.`.
_META_LAYER_MODULES = {
    'attention.wq': 'self_attn.q_proj',
    'attention.wk': 'self_attn.k_proj',
    'attention.wv': 'self_attn.v_proj',
    'attention.wo': 'self_attn.o_proj',
    'feed_forward.w1': 'mlp.gate_proj',
    'feed_forward.w3': 'mlp.up_proj',
    'feed_forward.w2': 'mlp.down_proj',
    'attention_norm': 'input_layernorm',
    'ffn_norm': 'post_attention_layernorm',
}
_META_GLOBAL_KEYS = {
    'tok_embeddings.weight': 'model.embed_tokens.weight',
    'norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
}
# Present in LLaMA-1 checkpoints, recomputed by transformers.
_META_IGNORED_KEYS = {'rope.freqs'}
# Model-parallel shard layout (Meta's ColumnParallel / RowParallel / ParallelEmbedding); other tensors are copies.
_META_SHARD_DIM = {
    'attention.wq': 0, 'attention.wk': 0, 'attention.wv': 0, 'feed_forward.w1': 0, 'feed_forward.w3': 0,
    'output': 0, 'attention.wo': 1, 'feed_forward.w2': 1, 'tok_embeddings': 1,
}


def _dtype_kwarg() -> str:
    """transformers renamed `torch_dtype` to `dtype` in 4.56 (requirements allow >= 4.51)."""
    import transformers
    from packaging.version import Version

    return 'dtype' if Version(transformers.__version__) >= Version('4.56') else 'torch_dtype'


def permute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k producer from Meta's interleaved RoPE layout to transformers' halves.

    Works for weights (out, in), LoRA up factors (out, rank) and biases (out,).
    """
    rows = weight.shape[0]
    head_dim = rows // num_heads
    flat = weight.reshape(rows, -1)
    permuted = flat.view(num_heads, head_dim // 2, 2, flat.shape[1]).transpose(1, 2).reshape(rows, -1)
    return permuted.reshape(weight.shape)


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of `permute_rotary_rows`: transformers' halves back to Meta's interleaved layout."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    flat = weight.reshape(rows, -1)
    interleaved = flat.view(num_heads, 2, head_dim // 2, flat.shape[1]).transpose(1, 2).reshape(rows, -1)
    return interleaved.reshape(weight.shape)


# ---------------------------------------------------------------------------------------------- Meta LLaMA


@dataclass(frozen=True)
class MetaLlamaParams:
    """The fields of Meta's `params.json` (LLaMA 1/2 style)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    vocab_size: int = -1
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    @classmethod
    def from_json(cls, path: PathLike) -> MetaLlamaParams:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f'{path}: cannot read params.json ({exc})') from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f'{path}: params.json must hold an object')
        if raw.get('use_scaled_rope'):
            raise CheckpointError(f'{path}: scaled RoPE (Llama 3.1) is not supported; use the Hugging Face format')
        known = {f.name for f in fields(cls)}
        ignored = sorted(set(raw) - known - {'use_scaled_rope'})
        if ignored:
            logger.warning('%s: ignoring unknown params %s', path, ignored)
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise CheckpointError(f'{path}: incomplete params.json ({exc})') from exc

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width: 2/3 of 4*dim, times ffn_dim_multiplier, rounded up to multiple_of (Meta's FeedForward)."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_hf_config(self, vocab_size: int, bos_id: int | None, eos_id: int | None,
                     dtype: torch.dtype) -> LlamaConfig:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=self.dim, intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads, num_key_value_heads=self.kv_heads,
            rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta, max_position_embeddings=self.max_seq_len,
            bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False, **{_dtype_kwarg(): dtype})


@dataclass(frozen=True)
class MetaLlamaFiles:
    """Where the pieces of a Meta LLaMA checkpoint are."""

    checkpoint_dir: Path
    shards: tuple[Path, ...]
    params: Path
    tokenizer: Path


def find_meta_llama(path: PathLike, model_size: str | None = None) -> MetaLlamaFiles:
    """Locate shards, params.json and tokenizer.model in `path` or in `path/<model_size>` (e.g. '7B')."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f'{root}: LLaMA directory not found')
    if model_size is not None:
        checkpoint_dir = root / model_size
    elif (root / 'params.json').is_file():
        checkpoint_dir = root
    else:
        found = sorted(d for d in root.iterdir() if (d / 'params.json').is_file())
        if len(found) != 1:
            what = 'no params.json' if not found else f'several models ({", ".join(d.name for d in found)})'
            raise CheckpointError(f'{root}: {what} found; pass the model folder or model_size')
        checkpoint_dir = found[0]
    params = checkpoint_dir / 'params.json'
    if not params.is_file():
        raise CheckpointError(f'{checkpoint_dir}: params.json not found')
    shards = tuple(sorted(checkpoint_dir.glob('consolidated.*.pth')))
    if not shards:
        raise CheckpointError(f'{checkpoint_dir}: no consolidated.*.pth checkpoint found')
    tokenizer = next((d / 'tokenizer.model' for d in (checkpoint_dir, checkpoint_dir.parent)
                      if (d / 'tokenizer.model').is_file()), None)
    if tokenizer is None:
        raise CheckpointError(f'{checkpoint_dir}: tokenizer.model not found there or in {checkpoint_dir.parent}')
    return MetaLlamaFiles(checkpoint_dir, shards, params, tokenizer)


def _meta_module(key: str) -> str:
    """'layers.3.attention.wq.weight' -> 'attention.wq'; 'tok_embeddings.weight' -> 'tok_embeddings'."""
    return re.sub(r'^layers\.\d+\.', '', key).rsplit('.', 1)[0]


def merge_meta_shards(shards: list[dict[str, torch.Tensor]], files: tuple[Path, ...]) -> dict[str, torch.Tensor]:
    """Concatenate model-parallel shards (13B: 2, 30B: 4, 65B: 8) into one state dict."""
    if len(shards) == 1:
        return shards[0]
    keys = set(shards[0])
    for shard, file in zip(shards[1:], files[1:], strict=True):
        if set(shard) != keys:
            raise CheckpointError(f'{file}: its keys differ from {files[0]} '
                                  f'({listing(sorted(keys.symmetric_difference(shard)))})')
    merged = {}
    for key in shards[0]:
        dim = _META_SHARD_DIM.get(_meta_module(key))
        parts = [shard[key] for shard in shards]
        merged[key] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return merged


def _meta_key_names(params: MetaLlamaParams) -> dict[str, str]:
    """Meta key -> transformers key, for every tensor the model needs."""
    names = dict(_META_GLOBAL_KEYS)
    for i in range(params.n_layers):
        for meta, hf in _META_LAYER_MODULES.items():
            names[f'layers.{i}.{meta}.weight'] = f'model.layers.{i}.{hf}.weight'
    return names


def meta_to_hf_state_dict(state: dict[str, torch.Tensor], params: MetaLlamaParams,
                          source: PathLike) -> dict[str, torch.Tensor]:
    """Rename Meta keys to transformers' and permute wq/wk rows; unexpected or missing keys raise."""
    names = _meta_key_names(params)
    unexpected = sorted(set(state) - set(names) - _META_IGNORED_KEYS)
    missing = sorted(set(names) - set(state))
    if unexpected or missing:
        raise CheckpointError(f'{source}: does not match params.json ({params.n_layers} layers); '
                              f'missing {listing(missing) or "none"}; unexpected {listing(unexpected) or "none"}')
    converted = {}
    for meta, hf in names.items():
        tensor = state[meta]
        if meta.endswith('attention.wq.weight'):
            tensor = permute_rotary_rows(tensor, params.n_heads)
        elif meta.endswith('attention.wk.weight'):
            tensor = permute_rotary_rows(tensor, params.kv_heads)
        converted[hf] = tensor
    return converted


def _check_shapes(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: PathLike,
                  names: Mapping[str, str] | None = None) -> None:
    """Raise if a tensor does not have its parameter's shape; `names` maps model names back to file keys."""
    expected = model.state_dict()
    bad = [f'{(names or {}).get(k, k)}: expected {tuple(expected[k].shape)}, got {tuple(v.shape)}'
           for k, v in state.items() if tuple(expected[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f'{source}: {len(bad)} tensor(s) have the wrong shape for this model: '
                              f'{listing(bad, sep="; ")}')


def load_meta_llama(path: PathLike, model_size: str | None = None, *,
                    dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, SentencePieceTokenizer]:
    """Load a Meta-format LLaMA as a transformers `LlamaForCausalLM` (on CPU, eval mode) and its tokenizer."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    files = find_meta_llama(path, model_size)
    params = MetaLlamaParams.from_json(files.params)
    try:
        tokenizer = SentencePieceTokenizer(files.tokenizer)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    shards = [tensor_state_dict(load_weights(file, 'LLaMA shard'), file, 'LLaMA shard') for file in files.shards]
    source = files.shards[0] if len(files.shards) == 1 else files.checkpoint_dir
    state = meta_to_hf_state_dict(merge_meta_shards(shards, files.shards), params, source)
    if state['model.embed_tokens.weight'].shape[0] != tokenizer.vocab_size:
        raise CheckpointError(f'{source}: {state["model.embed_tokens.weight"].shape[0]} token embeddings but '
                              f'{files.tokenizer} has {tokenizer.vocab_size} pieces')

    config = params.to_hf_config(tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, dtype)
    # Build without allocating, then adopt the (memory-mapped) tensors: peak RAM stays near one copy.
    with torch.device('meta'):
        model = LlamaForCausalLM(config)
    _check_shapes(model, state, source, names={hf: meta for meta, hf in _meta_key_names(params).items()})
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config=config)  # its buffers are not in the checkpoint
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f'{source}: tensors left unset after loading: {listing(leftover)}')
    logger.info('loaded Meta LLaMA %s: %d layers, width %d, %d shard(s)', files.checkpoint_dir, params.n_layers,
                params.dim, len(files.shards))
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------ Hugging Face


def load_hf_llama(path: PathLike, *, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, HFTokenizer]:
    """Load a local Hugging Face LLaMA directory (never downloads) and its tokenizer; eval mode, CPU."""
    from transformers import LlamaForCausalLM

    root = Path(path)
    config_file = root / 'config.json'
    try:
        model_type = json.loads(config_file.read_text()).get('model_type')
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f'{config_file}: no readable Hugging Face config ({exc})') from exc
    if model_type != 'llama':
        raise CheckpointError(f"{config_file}: model_type is '{model_type}', only 'llama' backbones are supported")
    try:
        model, info = LlamaForCausalLM.from_pretrained(root, local_files_only=True, output_loading_info=True,
                                                       **{_dtype_kwarg(): dtype})
    except pickle.UnpicklingError as exc:  # transformers reads *.bin weights with torch.load(weights_only=True)
        raise CheckpointError(f'{root}: refused to load the Hugging Face weights: the weights-only unpickler '
                              'rejected them (they are not plain tensors, or would run code); use model.safetensors'
                              ) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f'{root}: cannot load the Hugging Face model ({exc})') from exc
    problems = {kind: sorted(info.get(kind) or ()) for kind in ('missing_keys', 'unexpected_keys', 'mismatched_keys')}
    problems = {kind: [str(k) for k in keys] for kind, keys in problems.items() if keys}
    if problems:
        raise CheckpointError(f'{root}: weights do not match its config: '
                              + '; '.join(f'{kind} {listing(keys)}' for kind, keys in problems.items()))
    try:
        tokenizer = HFTokenizer.from_pretrained(root)
    except TokenizerError as exc:
        raise CheckpointError(str(exc)) from exc
    logger.info('loaded Hugging Face LLaMA %s: %d layers, width %d', root, model.config.num_hidden_layers,
                model.config.hidden_size)
    return model.eval(), tokenizer


def load_backbone(path: PathLike, model_size: str | None = None, *,
                  dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, TextTokenizer]:
    """Load a LLaMA from a Hugging Face directory (has config.json) or a Meta directory (anything else)."""
    if (Path(path) / 'config.json').is_file():
        return load_hf_llama(path, dtype=dtype)
    return load_meta_llama(path, model_size, dtype=dtype)


# ------------------------------------------------------------------------------------ ImageBind-LLM adapter


def _lora_module(hf_module: str) -> str:
    """Where the LoRA/bias wrapper of a projection lives in the patched model."""
    return 'self_attn.o_proj.proj' if hf_module == 'self_attn.o_proj' else hf_module


def adapter_key_map(model: ImageBindLLM) -> dict[str, tuple[str, int | None]]:
    """Official adapter key -> (our parameter name, heads to permute RoPE rows for, or None)."""
    keys: dict[str, tuple[str, int | None]] = {
        'image_bind_proj.weight': ('bind_network.proj.weight', None),
        'image_bind_proj.bias': ('bind_network.proj.bias', None),
        'prefix_query.weight': ('prefix_query.weight', None),
        'llama.norm.weight': ('backbone.model.norm.weight', None),
    }
    for b in range(model.config.bind_blocks):
        keys[f'image_bind_norm_{b + 1}.weight'] = (f'bind_network.blocks.{b}.norm.weight', None)
        for i in (1, 2, 3):
            keys[f'image_bind_f{i}_{b + 1}.weight'] = (f'bind_network.blocks.{b}.w{i}.weight', None)
    rotary_heads = {'attention.wq': model.num_heads, 'attention.wk': model.num_kv_heads}
    for n in range(len(model.layers)):
        official, ours = f'llama.layers.{n}.', f'backbone.model.layers.{n}.'
        keys[official + 'attention.gate'] = (ours + 'self_attn.o_proj.gate', None)
        for meta, hf in _META_LAYER_MODULES.items():
            if meta.endswith('norm'):
                keys[f'{official}{meta}.weight'] = (f'{ours}{hf}.weight', None)
                continue
            heads = rotary_heads.get(meta)
            wrapper = ours + _lora_module(hf)
            if meta not in ('attention.wk', 'attention.wv'):
                keys[f'{official}{meta}.bias'] = (f'{wrapper}.bias', heads)
            parent, name = meta.split('.')
            lora = f'{official}{parent}.lora_{name}'
            keys[lora + '_l1.weight'] = (f'{wrapper}.lora_a.weight', None)
            keys[lora + '_l2.weight'] = (f'{wrapper}.lora_b.weight', heads)
    return keys


def is_language_key(official_key: str) -> bool:
    """Whether an adapter key belongs to the LLaMA side (LoRA, biases, norms, gates) rather than the bind network
    or the prefix query, which only images (or other ImageBind inputs) train."""
    return official_key.startswith('llama.')


def adapter_state_dict(model: ImageBindLLM, language_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's adapter in the official key layout (the inverse of loading), e.g. to save a tuned adapter.

    `language_only` keeps only the LLaMA-side keys (`is_language_key`): what a text-only tuning changes.
    """
    model.require_unmerged('save the adapter')
    parameters = dict(model.named_parameters())
    state = {}
    for key, (name, heads) in adapter_key_map(model).items():
        if language_only and not is_language_key(key):
            continue
        value = parameters[name].detach()
        state[key] = (value if heads is None else unpermute_rotary_rows(value, heads)).clone()
    return state


def load_adapter_state_dict(model: ImageBindLLM, state: Mapping[str, torch.Tensor],
                            source: PathLike = '<state dict>') -> None:
    """Copy an official-key adapter state dict into `model` (strict: every key, exact shapes).

    A state with none of the bind network's and prefix query's keys is a language-side adapter (a text-only
    tuning, `adapter_state_dict(language_only=True)`): it must hold every LLaMA-side key, and the bind network
    keeps its values. A model whose adapters are merged (`ImageBindLLM.merge_adapters`) raises
    `AdaptersMergedError`.
    """
    model.require_unmerged(f'load the adapter {source}')
    mapping = adapter_key_map(model)
    language_only = bool(state) and all(is_language_key(key) for key in state)
    if language_only:
        mapping = {key: value for key, value in mapping.items() if is_language_key(key)}
    unexpected = sorted(set(state) - set(mapping))
    missing = sorted(set(mapping) - set(state))
    if unexpected or missing:
        legacy = any(k.startswith('image_bind_') and k.endswith('.bias') and k != 'image_bind_proj.bias'
                     for k in unexpected)
        hint = ' (a legacy LayerNorm-bridge checkpoint, not supported)' if legacy else ''
        raise CheckpointError(f'{source}: not an ImageBind-LLM adapter for this backbone{hint} '
                              f'({len(model.layers)} layers, {model.config.bind_blocks} bind blocks); '
                              f'missing {listing(missing) or "none"}; unexpected {listing(unexpected) or "none"}')
    renamed = {name: state[key] for key, (name, _) in mapping.items()}
    _check_shapes(model, renamed, source, names={name: key for key, (name, _) in mapping.items()})
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, (name, heads) in mapping.items():
            value = state[key] if heads is None else permute_rotary_rows(state[key], heads)
            parameters[name].copy_(value)
    # Features set before this load used the old weights.
    model.set_visual_features(None)
    logger.info('loaded ImageBind-LLM adapter %s (%d tensors%s)', source, len(mapping),
                '; language side only: the bind network keeps its initial weights' if language_only else '')


def load_adapter_checkpoint(model: ImageBindLLM, path: PathLike) -> None:
    """Load an adapter file into `model`: the official one (`{'model': state_dict}`), a bare state dict, or
    safetensors (a tuned language-side adapter, see `load_adapter_state_dict`)."""
    path = Path(path)
    obj = load_weights(path, 'ImageBind-LLM adapter')
    if isinstance(obj, Mapping) and 'model' in obj:
        obj = obj['model']  # a 'config' entry next to it is informational only
    load_adapter_state_dict(model, tensor_state_dict(obj, path, 'ImageBind-LLM adapter'), path)


def load_imagebind_llm(llama_path: PathLike, adapter_path: PathLike | None, *,
                       config: ImageBindLLMConfig | None = None, model_size: str | None = None,
                       dtype: torch.dtype = torch.float32,
                       device: str | torch.device = 'cpu') -> tuple[ImageBindLLM, TextTokenizer]:
    """Backbone (Meta or HF directory) + adapter file -> ready `ImageBindLLM` in eval mode on `device`.

    Without `adapter_path` the additions keep their zero initialisation, i.e. the model is the plain backbone.
    """
    backbone, tokenizer = load_backbone(llama_path, model_size, dtype=dtype)
    model = ImageBindLLM(backbone, config)
    if adapter_path is not None:
        load_adapter_checkpoint(model, adapter_path)
    return model.to(device).eval(), tokenizer
