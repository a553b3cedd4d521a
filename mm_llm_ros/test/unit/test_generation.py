"""Decoding loop: greedy/sampling semantics, top-p, KV cache, truncation, streaming text and cancellation."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mm_llm_ros.core.llm.backbones import tiny_random_backbone
from mm_llm_ros.core.llm.generation import (
    GenerationConfig,
    GenerationError,
    IncrementalDecoder,
    generate,
    generate_stream,
    sample_top_p,
    top_p_filter,
    truncate_prompt,
)

BOS, EOS, VOCAB = 256, 257, 259


class ByteTokenizer:
    """Stand-in tokenizer: token id = UTF-8 byte, plus BOS/EOS (the tiny backbone's vocabulary)."""

    bos_id = BOS
    eos_id = EOS
    vocab_size = VOCAB

    def encode(self, text: str, bos: bool, eos: bool = False) -> list[int]:
        return [BOS] * bos + list(text.encode()) + [EOS] * eos

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode('utf-8', errors='replace')


class ScriptedLM:
    """A causal LM stand-in that emits a fixed token sequence and records how it is called."""

    def __init__(self, script: list[int]) -> None:
        self.script = script
        self.calls: list[int] = []  # tokens fed per call
        self.inference_mode: list[bool] = []

    def __call__(self, input_ids: torch.Tensor, use_cache: bool, logits_to_keep: int, **cache: object):
        self.calls.append(input_ids.shape[1])
        self.inference_mode.append(torch.is_inference_mode_enabled())
        logits = torch.full((1, 1, VOCAB), -1e4)
        logits[0, 0, self.script[min(len(self.calls) - 1, len(self.script) - 1)]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=None, cache=None)


@pytest.fixture(scope='module')
def tiny():
    return tiny_random_backbone(seed=0)


@pytest.fixture
def tokenizer():
    return ByteTokenizer()


def test_greedy_matches_a_manual_argmax_loop_without_cache(tiny, tokenizer):
    prompt = tokenizer.encode('Describe the scene.', bos=True)
    config = GenerationConfig(max_new_tokens=12, temperature=0.0, stop_on_eos=False)

    result = generate(tiny.model, tokenizer, prompt, config)

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = tiny.model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    assert result.token_ids == ids[len(prompt):]
    assert result.stopped_reason == 'max_new_tokens'
    assert result.n_tokens == 12
    assert result.n_prompt_tokens == len(prompt)


def test_imagebind_llm_generates_through_its_kv_cache_like_a_manual_loop(tokenizer):
    from mm_llm_ros.core.llm.model import ImageBindLLM, ImageBindLLMConfig

    model = ImageBindLLM(tiny_random_backbone(seed=1).model, ImageBindLLMConfig(embed_dim=16, lora_rank=2)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith('.gate'):
                parameter.fill_(0.5)  # open gates: the visual vector changes the logits
    model.set_visual_features(torch.randn(16))
    prompt = tokenizer.encode('What do you see?', bos=True)

    result = generate(model, tokenizer, prompt, GenerationConfig(max_new_tokens=8, temperature=0.0,
                                                                 stop_on_eos=False))

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert result.token_ids == ids[len(prompt):]


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(tiny, tokenizer):
    prompt = tokenizer.encode('Hello', bos=True)
    config = GenerationConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7, stop_on_eos=False)

    first = generate(tiny.model, tokenizer, prompt, config)
    torch.manual_seed(1234)  # the global seed must not matter
    second = generate(tiny.model, tokenizer, prompt, config)
    other = generate(tiny.model, tokenizer, prompt, GenerationConfig(**{**config.__dict__, 'seed': 8}))
    rng_after = torch.random.get_rng_state()

    assert first.token_ids == second.token_ids
    assert first.seed == 7
    assert other.token_ids != first.token_ids
    torch.manual_seed(1234)
    assert torch.equal(rng_after, torch.random.get_rng_state()), 'generation consumed global random numbers'


def test_unseeded_sampling_reports_a_seed_that_reproduces_it(tiny, tokenizer):
    prompt = tokenizer.encode('Hi', bos=True)
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=1.0, stop_on_eos=False)
    result = generate(tiny.model, tokenizer, prompt, config)
    again = generate(tiny.model, tokenizer, prompt, GenerationConfig(**{**config.__dict__, 'seed': result.seed}))
    assert result.seed is not None
    assert again.token_ids == result.token_ids


def test_concurrent_seeded_generations_match_sequential_ones(tiny, tokenizer):
    prompt = tokenizer.encode('Threads', bos=True)
    configs = [GenerationConfig(max_new_tokens=10, temperature=1.0, seed=seed, stop_on_eos=False) for seed in (1, 2)]
    expected = [generate(tiny.model, tokenizer, prompt, config).token_ids for config in configs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda config: generate(tiny.model, tokenizer, prompt, config).token_ids, configs * 2))
    assert results == expected * 2


def _reference_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Published nucleus rule: a token stays when the mass of the more probable tokens is at most top_p."""
    order = np.argsort(-probs, kind='stable')
    kept = np.zeros_like(probs)
    mass_before = 0.0
    for token in order:
        if mass_before <= top_p:
            kept[token] = probs[token]
        mass_before += probs[token]
    return kept / kept.sum()


@pytest.mark.parametrize('top_p', [0.3, 0.5, 0.75, 0.9, 1.0])
def test_top_p_filter_matches_the_published_rule(top_p):
    # 0.5 + 0.25 = 0.75 exactly: with top_p=0.75 the third token is kept ("mass before > p" drops, not ">=").
    probs = np.array([0.1, 0.5, 0.15, 0.25], dtype=np.float32)
    kept, ids = top_p_filter(torch.from_numpy(probs)[None], top_p)
    filtered = np.zeros(4, dtype=np.float32)
    filtered[ids[0].numpy()] = kept[0].numpy()
    np.testing.assert_allclose(filtered, _reference_top_p(probs, top_p), rtol=1e-6)


def test_sample_top_p_draws_only_kept_tokens_with_their_renormalised_frequencies():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_top_p(probs, 0.6, generator) for _ in range(2000)], dim=1)  # (2, 2000)
    assert set(draws[0].tolist()) == {1, 3}  # mass before token 2 is 0.75 > 0.6
    assert set(draws[1].tolist()) == {0}
    assert abs((draws[0] == 1).float().mean().item() - 0.5 / 0.75) < 0.04


def test_cancellation_stops_before_the_next_model_call(tokenizer):
    model = ScriptedLM([ord('a')])
    received: list[str] = []
    stream = generate_stream(model, tokenizer, tokenizer.encode('x', bos=True),
                             GenerationConfig(max_new_tokens=50, temperature=0.0),
                             should_stop=lambda: len(received) >= 3)
    for event in stream:
        received.append(event.text)

    assert received == ['a', 'a', 'a']
    assert len(model.calls) == 3, 'a model call ran after cancellation was requested'
    assert stream.result.stopped_reason == 'cancelled'
    assert stream.result.text == 'aaa'


def test_cancellation_before_the_first_token_runs_no_model_call(tokenizer):
    model = ScriptedLM([ord('a')])
    result = generate(model, tokenizer, [BOS, 1], GenerationConfig(temperature=0.0), should_stop=lambda: True)
    assert model.calls == []
    assert result.stopped_reason == 'cancelled'
    assert result.n_tokens == 0
    assert result.time_to_first_token_s is None


def test_prefill_once_then_one_token_per_step_in_inference_mode(tokenizer):
    model = ScriptedLM([ord('b')])
    generate(model, tokenizer, [BOS, 10, 11, 12], GenerationConfig(max_new_tokens=5, temperature=0.0))
    assert model.calls == [4, 1, 1, 1, 1]
    assert all(model.inference_mode)


def test_streamed_pieces_concatenate_to_the_text_without_broken_characters(tokenizer):
    answer = 'héllo 日本 🤖!'
    model = ScriptedLM([*answer.encode(), EOS])
    events = []
    stream = generate_stream(model, tokenizer, [BOS], GenerationConfig(temperature=0.0))
    for event in stream:
        events.append(event)

    assert ''.join(event.text for event in events) == stream.result.text == answer
    assert not any('\ufffd' in event.text for event in events)
    assert [event.text for event in events[1:3]] == ['', 'é']  # é is two bytes: emitted with its second byte
    assert stream.result.stopped_reason == 'eos'
    assert stream.result.token_ids == list(answer.encode())  # EOS itself is not returned
    assert [event.index for event in events] == list(range(len(events)))


def test_an_incomplete_character_at_the_end_is_dropped(tokenizer):
    model = ScriptedLM([*'ok日'.encode()])
    result = generate(model, tokenizer, [BOS], GenerationConfig(max_new_tokens=4, temperature=0.0))
    assert result.text == 'ok'
    assert result.n_tokens == 4
    assert result.stopped_reason == 'max_new_tokens'


def test_eos_is_ignored_when_stop_on_eos_is_off(tokenizer):
    model = ScriptedLM([ord('a'), EOS, ord('b')])
    result = generate(model, tokenizer, [BOS], GenerationConfig(max_new_tokens=3, temperature=0.0,
                                                                 stop_on_eos=False))
    assert result.token_ids == [ord('a'), EOS, ord('b')]
    assert result.stopped_reason == 'max_new_tokens'


def test_incremental_decoder_waits_for_all_bytes_of_a_character(tokenizer):
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(byte) for byte in '🤖a'.encode()]
    assert pieces == ['', '', '', '🤖', 'a']


def test_generation_stops_at_the_context_length(tokenizer):
    model = ScriptedLM([ord('c')])
    result = generate(model, tokenizer, [BOS] + [65] * 19,
                      GenerationConfig(max_new_tokens=100, temperature=0.0, context_length=32))
    assert result.n_tokens == 12
    assert result.stopped_reason == 'context'


def test_truncate_prompt_keeps_bos_and_the_most_recent_tokens():
    prompt = [BOS, *range(100)]
    assert truncate_prompt(prompt, 8, BOS) == [BOS, 93, 94, 95, 96, 97, 98, 99]
    assert truncate_prompt(prompt[1:], 3, BOS) == [97, 98, 99]
    assert truncate_prompt(prompt, 200, BOS) == prompt


def test_a_prompt_that_fits_is_kept_whole_even_if_little_room_is_left(tokenizer):
    model = ScriptedLM([ord('c')])
    result = generate(model, tokenizer, [BOS] + [65] * 30, GenerationConfig(temperature=0.0, context_length=32))
    assert result.n_prompt_tokens == 31
    assert result.n_tokens == 1
    assert result.stopped_reason == 'context'


@pytest.mark.parametrize(('max_new_tokens', 'kept', 'reason'), [(5, 11, 'max_new_tokens'), (100, 8, 'context')])
def test_a_prompt_that_does_not_fit_is_cut_to_leave_room_for_the_answer(tiny, tokenizer, max_new_tokens, kept,
                                                                         reason):
    prompt = [BOS, *range(100)]
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, context_length=16,
                              stop_on_eos=False)
    result = generate(tiny.model, tokenizer, prompt, config)
    manual = generate(tiny.model, tokenizer, [BOS, *range(101 - kept, 100)], config)
    assert result.n_prompt_tokens == kept
    assert result.n_tokens == 16 - kept
    assert result.stopped_reason == reason
    assert result.token_ids == manual.token_ids


def test_result_reports_timing(tiny, tokenizer):
    result = generate(tiny.model, tokenizer, [BOS, 72], GenerationConfig(max_new_tokens=6, temperature=0.0,
                                                                          stop_on_eos=False))
    assert result.time_to_first_token_s > 0
    assert result.tokens_per_s > 0


@pytest.mark.parametrize('settings', [{'max_new_tokens': 0}, {'temperature': -0.1}, {'temperature': float('nan')},
                                      {'top_p': 0.0}, {'top_p': 1.5}, {'context_length': 1}])
def test_invalid_settings_are_rejected(settings):
    with pytest.raises(GenerationError):
        GenerationConfig(**settings)


def test_invalid_prompts_are_rejected(tiny, tokenizer):
    with pytest.raises(GenerationError, match='no tokens'):
        generate(tiny.model, tokenizer, [])
    with pytest.raises(GenerationError, match='>= 0'):
        generate(tiny.model, tokenizer, [BOS, -3])
    with pytest.raises(GenerationError, match='vocabulary'):
        generate(tiny.model, tokenizer, [BOS, 10_000], GenerationConfig(temperature=0.0))


def test_stream_can_be_consumed_from_a_worker_thread(tokenizer):
    model = ScriptedLM([*b'hi', EOS])
    pieces: list[str] = []
    stream = generate_stream(model, tokenizer, [BOS], GenerationConfig(temperature=0.0))
    worker = threading.Thread(target=lambda: pieces.extend(event.text for event in stream))
    worker.start()
    worker.join()
    assert ''.join(pieces) == 'hi'
    assert stream.result.stopped_reason == 'eos'
