"""Static-KV-cache decoding (`StaticDecoder`): the same tokens as the eager path, capture-safe, clear refusals.

CUDA graphs cannot run here (CI has no GPU); what makes the decode step capturable is that it never reads a value
back to the host, and `torch.compile(fullgraph=True)` proves that on the CPU: any data-dependent Python branch or
`.item()` would be a graph break, which fullgraph turns into an error.
"""
from __future__ import annotations

import logging

import pytest
import torch

from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.llm.backbones import tiny_random_backbone
from mm_llm_ros.core.llm.batching import BatchDecoder
from mm_llm_ros.core.llm.decoding import StaticDecoder, fallback_mode, resolve_decoder_mode
from mm_llm_ros.core.llm.generation import GenerationConfig, GenerationError, generate
from mm_llm_ros.core.llm.model import ImageBindLLM, ImageBindLLMConfig

from llm_factories import merged_tiny_imagebind_llm

GREEDY = GenerationConfig(max_new_tokens=40, temperature=0.0, stop_on_eos=False, context_length=128)
PROMPTS = ('Describe the scene in front of the robot.', 'Is anyone speaking?', 'x')


def _greedy_tokens(model, tokenizer, prompt: str, decoder=None, config=GREEDY) -> list[int]:
    ids = tokenizer.encode(prompt, bos=True)
    return generate(model, tokenizer, ids, config, decoder=decoder).token_ids


@pytest.fixture(scope='module')
def tiny():
    return tiny_random_backbone(seed=3)


@pytest.fixture(scope='module')
def merged():
    """A merged ImageBind-LLM over a GQA backbone with open gates and trained-like adapter values."""
    return merged_tiny_imagebind_llm()


@pytest.mark.parametrize('num_kv_heads', [4, 2])  # multi-head and grouped-query attention
def test_static_greedy_tokens_equal_the_eager_ones(num_kv_heads):
    backbone = tiny_random_backbone(seed=5, num_kv_heads=num_kv_heads)
    decoder = StaticDecoder(backbone.model, capacity=128)
    for prompt in PROMPTS:
        eager = _greedy_tokens(backbone.model, backbone.tokenizer, prompt)
        assert _greedy_tokens(backbone.model, backbone.tokenizer, prompt, decoder) == eager


def test_static_logits_match_the_eager_forward_at_every_step(tiny):
    ids = tiny.tokenizer.encode('What is ahead?', bos=True)
    decoder = StaticDecoder(tiny.model, capacity=64)
    with torch.inference_mode():
        static = [decoder.prefill(ids)]
        for token in (65, 66, 67):
            static.append(decoder.step(token))
        full = tiny.model(input_ids=torch.tensor([ids + [65, 66, 67]])).logits[0, len(ids) - 1:]
    torch.testing.assert_close(torch.stack(static), full, atol=1e-5, rtol=1e-5)


def test_merged_imagebind_llm_follows_each_querys_visual_features(merged):
    """The visual vector lives in o_proj's bias buffer, updated in place: a reused decoder sees every new query."""
    model, tokenizer = merged
    decoder = StaticDecoder(model.backbone, capacity=128, mode='static')
    answers = []
    for seed in (0, 1):
        model.set_visual_features(torch.randn(16, generator=torch.Generator().manual_seed(seed)))
        eager = _greedy_tokens(model.backbone, tokenizer, PROMPTS[0])
        assert _greedy_tokens(model.backbone, tokenizer, PROMPTS[0], decoder) == eager
        answers.append(eager)
    assert answers[0] != answers[1]  # the features matter, so the equality above is not vacuous


def test_seeded_sampling_draws_the_same_tokens_as_the_eager_path(tiny):
    config = GenerationConfig(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=11, stop_on_eos=False,
                              context_length=128)
    decoder = StaticDecoder(tiny.model, capacity=128)
    eager = _greedy_tokens(tiny.model, tiny.tokenizer, PROMPTS[0], config=config)
    assert _greedy_tokens(tiny.model, tiny.tokenizer, PROMPTS[0], decoder, config) == eager


def test_the_decoder_is_reused_across_generations_of_different_lengths(tiny):
    """Stale keys from a longer earlier sequence must not leak into a shorter later one."""
    decoder = StaticDecoder(tiny.model, capacity=128)
    _greedy_tokens(tiny.model, tiny.tokenizer, PROMPTS[0] * 2, decoder)
    for prompt in PROMPTS[::-1]:
        assert (_greedy_tokens(tiny.model, tiny.tokenizer, prompt, decoder)
                == _greedy_tokens(tiny.model, tiny.tokenizer, prompt))


def test_generation_fills_the_cache_exactly_to_the_context_length(tiny):
    prompt = tiny.tokenizer.encode('a' * 20, bos=True)
    config = GenerationConfig(max_new_tokens=100, temperature=0.0, stop_on_eos=False, context_length=len(prompt) + 9)
    decoder = StaticDecoder(tiny.model, capacity=config.context_length)
    result = generate(tiny.model, tiny.tokenizer, prompt, config, decoder=decoder)
    assert result.stopped_reason == 'context'
    assert result.token_ids == generate(tiny.model, tiny.tokenizer, prompt, config).token_ids


def test_a_sequence_longer_than_the_cache_is_decoded_eagerly(tiny, caplog):
    decoder = StaticDecoder(tiny.model, capacity=16)
    with caplog.at_level(logging.WARNING):
        tokens = _greedy_tokens(tiny.model, tiny.tokenizer, PROMPTS[0], decoder)
    assert tokens == _greedy_tokens(tiny.model, tiny.tokenizer, PROMPTS[0])
    assert 'exceed the static cache' in caplog.text


def test_cancellation_stops_the_static_loop_between_steps(tiny):
    decoder = StaticDecoder(tiny.model, capacity=128)
    steps = []

    def stop_after_five() -> bool:
        steps.append(1)
        return len(steps) > 5

    ids = tiny.tokenizer.encode(PROMPTS[0], bos=True)
    result = generate(tiny.model, tiny.tokenizer, ids, GREEDY, should_stop=stop_after_five, decoder=decoder)
    assert result.stopped_reason == 'cancelled'
    assert result.n_tokens == 5


def test_token_ids_outside_the_vocabulary_are_a_generation_error(tiny):
    decoder = StaticDecoder(tiny.model, capacity=64)
    with pytest.raises(GenerationError, match='vocabulary'):
        generate(tiny.model, tiny.tokenizer, [1, 2, 10_000], GREEDY, decoder=decoder)


def test_the_decode_step_compiles_as_one_graph_without_host_synchronisation(tiny):
    """fullgraph=True fails on any graph break (`.item()`, a data-dependent branch): what a CUDA graph needs."""
    decoder = StaticDecoder(tiny.model, capacity=64)
    compiled = torch.compile(decoder._decode_step, fullgraph=True, dynamic=False, backend='eager')
    ids = tiny.tokenizer.encode('Go', bos=True)
    decoder.prefill(ids)
    decoder._token.fill_(70)
    decoder._position.fill_(len(ids))
    with torch.inference_mode():
        traced = compiled()[0].clone()
    decoder.prefill(ids)
    torch.testing.assert_close(traced, decoder.step(70))


@pytest.mark.parametrize('name, device, expected', [
    ('auto', 'cpu', 'static'), ('auto', 'cuda', 'compile'), ('eager', 'cpu', 'eager'),
    ('compile', 'cpu', 'compile'), ('EAGER', 'cuda', 'eager'), ('', 'cpu', 'static'), ('cuda_graph', 'cuda', 'cuda_graph'),
])
def test_decoder_modes_resolve_per_device(name, device, expected):
    assert resolve_decoder_mode(name, torch.device(device)) == expected


def test_only_autos_compile_falls_back_to_the_graph():
    assert fallback_mode('auto', 'compile') == 'cuda_graph'
    assert fallback_mode('compile', 'compile') is None  # asked for explicitly: refused, not replaced
    assert fallback_mode('auto', 'eager') is None


def test_a_decoder_that_cannot_warm_up_falls_back_or_is_refused_with_the_reason(monkeypatch, caplog):
    from mm_llm_ros.core.llm import decoding
    from mm_llm_ros.core.llm.pipeline import _static_decoder

    def broken_compile(fn, **_):
        def step():
            raise RuntimeError('inductor: no C compiler found\nmore detail')
        return step

    monkeypatch.setattr(decoding.torch, 'compile', broken_compile)
    model = ImageBindLLM(tiny_random_backbone(seed=7).model, ImageBindLLMConfig(embed_dim=16, lora_rank=2)).eval()
    model.merge_adapters()
    with pytest.raises(ConfigError, match="'compile' cannot start: RuntimeError: inductor: no C compiler found$"):
        _static_decoder(model, 'compile', 64)
    with caplog.at_level(logging.WARNING):
        decoder = _static_decoder(model, 'compile', 64, fallback='static')
    assert decoder.mode == 'static'
    assert "'compile' cannot start (RuntimeError: inductor: no C compiler found); decoding with 'static'" in caplog.text


def test_unusable_decoder_settings_are_refused_with_the_reason(tiny):
    with pytest.raises(ConfigError, match="'cuda_graph' needs a CUDA device"):
        resolve_decoder_mode('cuda_graph', torch.device('cpu'))
    with pytest.raises(ConfigError, match='must be one of'):
        resolve_decoder_mode('fast', torch.device('cpu'))
    with pytest.raises(ConfigError, match='needs the model on a CUDA device'):
        StaticDecoder(tiny.model, capacity=32, mode='cuda_graph')
    unmerged = ImageBindLLM(tiny_random_backbone(seed=6).model, ImageBindLLMConfig(embed_dim=16, lora_rank=2))
    with pytest.raises(ConfigError, match='merge_adapters'):
        StaticDecoder(unmerged.backbone, capacity=32, mode='compile')
    with pytest.raises(ConfigError, match='not a LLaMA-style'):
        StaticDecoder(torch.nn.Linear(2, 2), capacity=32)


def _answer(answerer, question: str, embeddings) -> str:
    pieces: list[str] = []
    generated = answerer.answer(question, embeddings, 24, pieces.append, lambda: False)
    assert ''.join(pieces) == generated.text
    return generated.text


def test_build_answerer_serves_through_the_configured_decoder():
    import numpy as np

    from mm_llm_ros.core.embedding_store import StoredInput
    from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer

    params = {'llm.preset': 'tiny', 'generation.max_new_tokens': 24, 'generation.temperature': 0.0,
              'generation.context_length': 256}
    assert build_answerer(LLMConfig.from_params({**params, 'generation.decoder': 'eager'})).decoder is None
    answerer = build_answerer(LLMConfig.from_params({**params, 'generation.decoder': 'static'}))
    decoder = answerer.decoder
    assert (decoder.mode, decoder.capacity) == ('static', 256)
    assert 'static decoder' in answerer.description
    vision = StoredInput('vision', np.random.default_rng(0).standard_normal(1024).astype(np.float32), 0, 0.0,
                         'tiny', 'embedding/vision')
    for embeddings in ([], [vision]):  # text only, then with the (open-gated) visual injection
        answerer.decoder = decoder
        static = _answer(answerer, 'What is ahead?', embeddings)
        answerer.decoder = None  # the same model decoded eagerly
        assert static == _answer(answerer, 'What is ahead?', embeddings)


def test_the_compiled_decoder_gives_the_eager_greedy_tokens(tiny):
    """mode 'compile' with inductor on the CPU (on CUDA the compiled step is also captured into a graph)."""
    decoder = StaticDecoder(tiny.model, capacity=128, mode='compile')
    assert _greedy_tokens(tiny.model, tiny.tokenizer, PROMPTS[0], decoder) == _greedy_tokens(
        tiny.model, tiny.tokenizer, PROMPTS[0])


def test_a_decoder_the_device_cannot_run_is_refused_before_loading():
    from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer

    with pytest.raises(ConfigError, match="'cuda_graph' needs a CUDA device"):
        build_answerer(LLMConfig.from_params({'llm.preset': 'tiny', 'device': 'cpu',
                                              'generation.decoder': 'cuda_graph'}))


SYSTEM = 'You are a robot. Answer from the readings; if they do not hold the answer, say: I cannot tell. '


def test_a_repeated_prompt_prefix_is_reused_with_the_same_tokens(merged):
    """The second prompt shares the first one's system prefix: its keys and values are not computed again, and the
    tokens are those of a fresh decoder (which computes the whole prompt)."""
    model, tokenizer = merged
    model.set_visual_features(torch.randn(16, generator=torch.Generator().manual_seed(1)))
    reused = StaticDecoder(model.backbone, capacity=128)
    _greedy_tokens(model.backbone, tokenizer, SYSTEM + 'Is the door open?', reused)
    for question in ('Where is the ball?', 'x'):
        tokens = _greedy_tokens(model.backbone, tokenizer, SYSTEM + question, reused)
        shared = len(tokenizer.encode(SYSTEM, bos=True))
        assert shared - 2 <= reused.reused <= shared + 1  # the byte tokenizer: the prefix's tokens, maybe one more
        fresh = StaticDecoder(model.backbone, capacity=128)
        assert tokens == _greedy_tokens(model.backbone, tokenizer, SYSTEM + question, fresh)
        assert fresh.reused == 0


def test_new_visual_features_or_a_failed_prefill_reuse_nothing(merged):
    model, tokenizer = merged
    decoder = StaticDecoder(model.backbone, capacity=128)
    ids = tokenizer.encode(SYSTEM + 'What is ahead?', bos=True)
    model.set_visual_features(torch.randn(16, generator=torch.Generator().manual_seed(2)))
    decoder.prefill(ids)
    decoder.prefill(ids)
    assert decoder.reused == len(ids) - 2
    model.set_visual_features(torch.randn(16, generator=torch.Generator().manual_seed(3)))  # o_proj's bias changes
    decoder.prefill(ids)
    assert decoder.reused == 0
    with pytest.raises(IndexError):
        decoder.prefill(ids[:-1] + [10**6])  # refused before anything is written
    assert decoder.reused == 0 and decoder._prompt == ids
    embeddings = model.backbone.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError('fault')))
    try:
        with pytest.raises(RuntimeError, match='fault'):
            decoder.prefill(ids)
    finally:
        handle.remove()
    decoder.prefill(ids)
    assert decoder.reused == 0  # the failed prefill may have overwritten slots: nothing is trusted


@torch.inference_mode()
def test_without_prefix_reuse_a_prompts_logits_do_not_depend_on_what_came_before(merged):
    """`generation.prefix_reuse: false`. With reuse, a prompt's prefill runs its products over fewer rows, which sum
    in another order: its logits can differ in their last bits with the previous prompt (they do here). Without,
    every prompt is prefilled whole: the same bits after any history, in the serial and the batch decoder."""
    model, tokenizer = merged
    model.set_visual_features(None)
    prompt = tokenizer.encode(SYSTEM + 'Where is the ball?', bos=True)
    fresh = StaticDecoder(model.backbone, capacity=128).prefill(prompt)
    histories = [[], prompt[:12] + [9], prompt[:-3] + [9]]

    def after(history, reuse_prefix):
        decoder = StaticDecoder(model.backbone, capacity=128, reuse_prefix=reuse_prefix)
        batch = BatchDecoder(model.backbone, 2, 128, reuse_prefix=reuse_prefix)
        if history:
            decoder.prefill(history)
            batch.admit(0, history)
        logits = decoder.prefill(prompt), batch.admit(1, prompt)
        assert decoder.reused == batch.reused == (0 if not reuse_prefix or not history else decoder.reused)
        return logits

    reused = [after(history, True) for history in histories]
    assert not all(torch.equal(serial, fresh) for serial, _ in reused)  # the bits this switch is about
    for serial, batched in (after(history, False) for history in histories):
        assert torch.equal(serial, fresh) and torch.equal(batched, fresh)


def test_prefix_reuse_is_a_parameter_of_both_engines():
    from mm_llm_ros.core.llm.pipeline import LLMConfig, build_answerer

    assert LLMConfig.from_params().prefix_reuse is True
    answerer = build_answerer(LLMConfig.from_params({'llm.preset': 'tiny', 'device': 'cpu', 'max_queue': 4,
                                                     'generation.max_batch': 2, 'generation.prefix_reuse': False}))
    assert answerer.decoder.reuse_prefix is False and answerer.batch.decoder.reuse_prefix is False
