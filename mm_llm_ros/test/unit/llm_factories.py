"""Small random checkpoints in the published formats, for the ImageBind-LLM model and loader tests.

Everything is written with the official layouts and key names (Meta `consolidated.00.pth` + `params.json` +
SentencePiece `tokenizer.model`; the ImageBind-LLM adapter `{'model': state_dict}`), with non-zero random values
for gates, LoRA factors and biases so that each part of the adapter changes the logits.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mm_llm_ros.core.llm.checkpoints import MetaLlamaParams, load_adapter_state_dict, meta_to_hf_state_dict
from mm_llm_ros.core.llm.model import ImageBindLLM, ImageBindLLMConfig

# Enough distinct text for a 100-piece BPE vocabulary.
_CORPUS = [
    'Below is an instruction that describes a task. Write a response that appropriately completes the request.',
    'the quick brown fox jumps over the lazy dog near the river bank',
    'a mobile robot sees a red ball on the kitchen table and a green cup',
    'what is in the image? describe the sound you hear in this recording',
    'there is a person walking in the corridor with a blue backpack',
    'the camera shows a door, a window, two chairs and a small plant',
]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny LLaMA + ImageBind-LLM adapter (official structure, toy widths)."""

    dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int | None = None
    vocab_size: int = 100
    multiple_of: int = 32
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    embed_dim: int = 16
    lora_rank: int = 4
    bind_blocks: int = 3
    bind_mult: int = 4
    query_layers: int | None = None

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return (self.n_kv_heads or self.n_heads) * self.head_dim

    @property
    def ffn_dim(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @property
    def n_queries(self) -> int:
        return self.query_layers or self.n_layers

    def params_json(self) -> dict:
        params = {'dim': self.dim, 'n_layers': self.n_layers, 'n_heads': self.n_heads, 'vocab_size': -1,
                  'multiple_of': self.multiple_of, 'norm_eps': self.norm_eps}
        if self.n_kv_heads is not None:
            params['n_kv_heads'] = self.n_kv_heads
        if self.rope_theta != 10000.0:
            params['rope_theta'] = self.rope_theta
        return params

    def adapter_config(self) -> ImageBindLLMConfig:
        return ImageBindLLMConfig(embed_dim=self.embed_dim, lora_rank=self.lora_rank, bind_blocks=self.bind_blocks,
                                  bind_mult=self.bind_mult, query_layers=self.query_layers)


def _linear(generator: torch.Generator, out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
    return gain * torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)


def _norm(generator: torch.Generator, dim: int) -> torch.Tensor:
    return 1.0 + 0.1 * torch.randn(dim, generator=generator)


def random_meta_state_dict(spec: TinySpec, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Meta LLaMA state dict (official key names, including LLaMA-1's unused `rope.freqs`)."""
    g = torch.Generator().manual_seed(seed)
    d, h = spec.dim, spec.ffn_dim
    state = {
        'tok_embeddings.weight': torch.randn(spec.vocab_size, d, generator=g),
        'norm.weight': _norm(g, d),
        'output.weight': _linear(g, spec.vocab_size, d),
        'rope.freqs': torch.randn(spec.head_dim // 2, generator=g),
    }
    for i in range(spec.n_layers):
        p = f'layers.{i}.'
        state |= {
            p + 'attention.wq.weight': _linear(g, d, d),
            p + 'attention.wk.weight': _linear(g, spec.kv_dim, d),
            p + 'attention.wv.weight': _linear(g, spec.kv_dim, d),
            p + 'attention.wo.weight': _linear(g, d, d),
            p + 'feed_forward.w1.weight': _linear(g, h, d),
            p + 'feed_forward.w2.weight': _linear(g, d, h),
            p + 'feed_forward.w3.weight': _linear(g, h, d),
            p + 'attention_norm.weight': _norm(g, d),
            p + 'ffn_norm.weight': _norm(g, d),
        }
    return state


def random_adapter_state_dict(spec: TinySpec, seed: int = 1) -> dict[str, torch.Tensor]:
    """An ImageBind-LLM adapter state dict with the official key names and non-zero gates, LoRA and biases."""
    g = torch.Generator().manual_seed(seed)
    d, h, r, m = spec.dim, spec.ffn_dim, spec.lora_rank, spec.bind_mult
    state = {
        'image_bind_proj.weight': _linear(g, d, spec.embed_dim),
        'image_bind_proj.bias': 0.1 * torch.randn(d, generator=g),
        'prefix_query.weight': torch.randn(spec.n_queries, d, generator=g),
        'llama.norm.weight': _norm(g, d),
    }
    for b in range(1, spec.bind_blocks + 1):
        state |= {
            f'image_bind_norm_{b}.weight': _norm(g, d),
            f'image_bind_f1_{b}.weight': _linear(g, m * d, d),
            f'image_bind_f2_{b}.weight': _linear(g, d, m * d, gain=0.5),
            f'image_bind_f3_{b}.weight': _linear(g, m * d, d),
        }
    lora_shapes = {'attention.lora_wq': (d, d), 'attention.lora_wk': (d, spec.kv_dim),
                   'attention.lora_wv': (d, spec.kv_dim), 'attention.lora_wo': (d, d),
                   'feed_forward.lora_w1': (d, h), 'feed_forward.lora_w2': (h, d), 'feed_forward.lora_w3': (d, h)}
    bias_sizes = {'attention.wq': d, 'attention.wo': d, 'feed_forward.w1': h, 'feed_forward.w2': d,
                  'feed_forward.w3': h}
    for i in range(spec.n_layers):
        p = f'llama.layers.{i}.'
        state[p + 'attention.gate'] = torch.randn(1, spec.n_heads, 1, 1, generator=g)
        state[p + 'attention_norm.weight'] = _norm(g, d)
        state[p + 'ffn_norm.weight'] = _norm(g, d)
        for name, size in bias_sizes.items():
            state[f'{p}{name}.bias'] = 0.1 * torch.randn(size, generator=g)
        for name, (fan_in, fan_out) in lora_shapes.items():
            state[f'{p}{name}_l1.weight'] = _linear(g, r, fan_in)
            state[f'{p}{name}_l2.weight'] = _linear(g, fan_out, r, gain=0.3)
    return state


def train_tokenizer(path: Path, vocab_size: int) -> Path:
    """Train a real SentencePiece BPE model (LLaMA's ids: unk 0, bos 1, eos 2) and write it to `path`."""
    import sentencepiece

    with path.open('wb') as out:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(_CORPUS * 4), model_writer=out, vocab_size=vocab_size, model_type='bpe',
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return path


def _shard(state: dict[str, torch.Tensor], shards: int) -> list[dict[str, torch.Tensor]]:
    """Split like Meta's model parallelism: column-parallel on dim 0, row-parallel and embeddings on dim 1."""
    column = ('wq.weight', 'wk.weight', 'wv.weight', 'w1.weight', 'w3.weight', 'output.weight')
    row = ('wo.weight', 'w2.weight', 'tok_embeddings.weight')
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for key, tensor in state.items():
        dim = 0 if key.endswith(column) else 1 if key.endswith(row) else None
        pieces = [tensor] * shards if dim is None else tensor.chunk(shards, dim=dim)
        for part, piece in zip(parts, pieces, strict=True):
            part[key] = piece.clone()
    return parts


def write_meta_llama(root: Path, spec: TinySpec, state: dict[str, torch.Tensor], *, shards: int = 1,
                     size: str = '7B') -> Path:
    """Official layout: `root/<size>/consolidated.NN.pth` + `params.json`, `root/tokenizer.model`."""
    model_dir = root / size
    model_dir.mkdir(parents=True, exist_ok=True)
    for index, part in enumerate(_shard(state, shards)):
        torch.save(part, model_dir / f'consolidated.{index:02d}.pth')
    (model_dir / 'params.json').write_text(json.dumps(spec.params_json()))
    train_tokenizer(root / 'tokenizer.model', spec.vocab_size)
    return root


def write_adapter(path: Path, state: dict[str, torch.Tensor], spec: TinySpec) -> Path:
    """The official adapter file: `{'model': state_dict, 'config': ...}`."""
    torch.save({'model': state, 'config': {'w_bias': True, 'w_lora': True, 'lora_rank': spec.lora_rank}}, path)
    return path


def write_hf_llama(directory: Path, backbone: torch.nn.Module, tokenizer_model: Path) -> Path:
    """A Hugging Face directory: `save_pretrained` (safetensors) + the tokenizer converted from SentencePiece."""
    from transformers import LlamaTokenizer

    backbone.save_pretrained(directory)
    shutil.copy(tokenizer_model, directory / 'tokenizer.model')
    LlamaTokenizer.from_pretrained(directory, local_files_only=True).save_pretrained(directory)
    return directory


def build_backbone(spec: TinySpec, meta_state: dict[str, torch.Tensor]):
    """The backbone assembled in memory (no files): Meta weights converted into a transformers LLaMA."""
    from transformers import LlamaForCausalLM

    params = MetaLlamaParams(**spec.params_json())
    config = params.to_hf_config(spec.vocab_size, bos_id=1, eos_id=2, dtype=torch.float32)
    backbone = LlamaForCausalLM(config)
    backbone.load_state_dict(meta_to_hf_state_dict(meta_state, params, '<memory>'), strict=True)
    return backbone.eval()


def build_model(spec: TinySpec, meta_state: dict[str, torch.Tensor],
                adapter_state: dict[str, torch.Tensor] | None) -> ImageBindLLM:
    """ImageBindLLM assembled in memory, with the adapter (official key names) when given."""
    model = ImageBindLLM(build_backbone(spec, meta_state), spec.adapter_config())
    if adapter_state is not None:
        load_adapter_state_dict(model, adapter_state)
    return model.eval()


def merged_tiny_imagebind_llm(dtype: torch.dtype = torch.float32):
    """A merged ImageBind-LLM over a GQA backbone with open gates and trained-like adapter values, in `dtype`, and
    its tokenizer: the fast decoders' and the batch decoder's reference model."""
    from mm_llm_ros.core.llm.backbones import tiny_random_backbone

    backbone = tiny_random_backbone(seed=4)
    model = ImageBindLLM(backbone.model, ImageBindLLMConfig(embed_dim=16, lora_rank=2)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(('gate', 'lora_b.weight', '.bias')):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    model.to(dtype).merge_adapters()
    return model, backbone.tokenizer
