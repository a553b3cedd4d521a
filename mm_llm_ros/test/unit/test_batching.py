"""Continuous batching (`batching.BatchDecoder`, `BatchScheduler`): a batch gives each request what it gets alone.

The reference is the serial path the node serves with today: `generation.generate` over a `StaticDecoder`, the
query's visual features set on the model first. Requests differ in prompt length, visual features (modalities),
token budget and sampling settings, and join a running batch at different steps.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mm_llm_ros.core.device import cpu_has_native_bfloat16
from mm_llm_ros.core.errors import ConfigError
from mm_llm_ros.core.llm.backbones import tiny_random_backbone
from mm_llm_ros.core.llm.batching import BatchDecoder, BatchRequest, BatchScheduler
from mm_llm_ros.core.llm.decoding import StaticDecoder
from mm_llm_ros.core.llm.generation import GenerationConfig, generate
from mm_llm_ros.core.llm.model import ImageBindLLM, ImageBindLLMConfig

from llm_factories import merged_tiny_imagebind_llm

GREEDY = GenerationConfig(max_new_tokens=40, temperature=0.0, stop_on_eos=False, context_length=128)


@pytest.fixture(scope='module')
def merged():
    """A merged ImageBind-LLM over a GQA backbone with open gates and trained-like adapter values."""
    return merged_tiny_imagebind_llm()


def _features(seed):
    return None if seed is None else torch.randn(16, generator=torch.Generator().manual_seed(seed))


# (prompt, visual-feature seed or None = text only, config)
REQUESTS = [
    ('Describe the scene in front of the robot.', 0, GREEDY),
    ('x', None, replace(GREEDY, max_new_tokens=7)),
    ('Is anyone speaking near the kitchen door right now?', 1, replace(GREEDY, max_new_tokens=23)),
    ('What is ahead?', 2, replace(GREEDY, max_new_tokens=1)),
    ('Where is the red ball?', None, replace(GREEDY, max_new_tokens=31)),
    ('Read the sign.', 0, replace(GREEDY, max_new_tokens=12)),
]


def _serial(model, tokenizer, prompt, seed, config, should_stop=None):
    decoder = StaticDecoder(model.backbone, capacity=config.context_length)
    model.set_visual_features(_features(seed))
    return generate(model.backbone, tokenizer, tokenizer.encode(prompt, bos=True), config, should_stop, decoder)


def _batched(model, tokenizer, requests, max_batch, join_at=None, stops=None):
    """Run `requests` through one scheduler; request i joins at step join_at[i] (or as soon as a row is free).
    Returns (results in request order, streamed texts, scheduler)."""
    scheduler = BatchScheduler(BatchDecoder(model.backbone, max_batch, GREEDY.context_length), tokenizer)
    results, texts = {}, {i: '' for i in range(len(requests))}
    waiting = list(range(len(requests)))
    join_at = join_at or [0] * len(requests)
    for step in range(1000):  # bounded: each step emits a token for every running row
        while waiting and scheduler.free and join_at[waiting[0]] <= step:
            i = waiting.pop(0)
            prompt, seed, config = requests[i]

            def on_token(event, i=i):
                texts[i] += event.text
            scheduler.join(BatchRequest(
                tokenizer.encode(prompt, bos=True), config, on_done=lambda r, i=i: results.__setitem__(i, r),
                on_token=on_token, should_stop=(stops or {}).get(i, lambda: False),
                prepare=lambda seed=seed: model.set_visual_features(_features(seed))))
        if not waiting and not scheduler.running:
            break
        scheduler.step()
    assert len(results) == len(requests)
    return [results[i] for i in range(len(requests))], texts, scheduler


@pytest.mark.parametrize('max_batch', [1, 3, 8])
def test_batched_greedy_tokens_equal_the_serial_ones(merged, max_batch):
    model, tokenizer = merged
    serial = [_serial(model, tokenizer, *request) for request in REQUESTS]
    assert len({tuple(r.token_ids) for r in serial}) == len(serial)  # the requests really differ
    # Staggered joins: newcomers are prefilled while others are mid-answer.
    batched, texts, scheduler = _batched(model, tokenizer, REQUESTS, max_batch, join_at=[0, 0, 3, 5, 5, 9])
    for one, many, i in zip(serial, batched, range(len(REQUESTS)), strict=True):
        assert many.token_ids == one.token_ids, f'request {i}'
        assert many.text == one.text == texts[i]
        assert many.stopped_reason == one.stopped_reason == 'max_new_tokens'
        assert many.n_prompt_tokens == one.n_prompt_tokens
    if max_batch > 1:  # fewer forwards than tokens: rows really shared steps
        assert scheduler.steps < sum(len(r.token_ids) - 1 for r in serial)


@pytest.mark.skipif(not cpu_has_native_bfloat16(), reason='bfloat16 is emulated on this CPU (no AVX512-BF16/AMX)')
@pytest.mark.parametrize('max_batch', [3, 8])  # 3: rows leave and rejoin, so steps gather scattered rows
def test_bfloat16_batches_give_exactly_the_serial_tokens(max_batch):
    """bfloat16 rounds every product and sum to 8 bits, so any change in summation order between the batch and the
    serial step shows in the tokens. oneDNN's bfloat16 products give each row the same bits in any batch; the batch
    decoder matches the rest (attention over each row's own span, o_proj's bias added inside the product)."""
    model, tokenizer = merged_tiny_imagebind_llm(torch.bfloat16)
    serial = [_serial(model, tokenizer, *request) for request in REQUESTS]
    batched, _, _ = _batched(model, tokenizer, REQUESTS, max_batch, join_at=[0, 0, 3, 5, 5, 9])
    assert [r.token_ids for r in batched] == [r.token_ids for r in serial]


def test_the_visual_features_of_each_row_stay_its_own(merged):
    """Same prompt, different features in one batch: each row's logits are its own query's serial logits."""
    model, tokenizer = merged
    ids = tokenizer.encode('Describe the scene.', bos=True)
    feeds = (65, 66, 67, 68)
    serial = []
    static = StaticDecoder(model.backbone, capacity=64)
    with torch.inference_mode():
        for seed in (0, 1, None):
            model.set_visual_features(_features(seed))
            serial.append(torch.stack([static.prefill(ids)] + [static.step(t) for t in feeds]))
    assert not torch.allclose(serial[0], serial[1], atol=1e-3)  # the features matter
    assert not torch.allclose(serial[0], serial[2], atol=1e-3)
    batch = BatchDecoder(model.backbone, 4, 64)
    rows = (3, 0, 2)  # any rows, not in order, one left empty
    first = []
    for row, seed in zip(rows, (0, 1, None), strict=True):
        model.set_visual_features(_features(seed))
        first.append(batch.admit(row, ids))
    model.set_visual_features(_features(5))  # the model's current query no longer matters to admitted rows
    steps = [batch.step(rows, [t] * 3) for t in feeds]
    for i in range(3):
        batched = torch.stack([first[i]] + [logits[i] for logits in steps])
        torch.testing.assert_close(batched, serial[i], atol=1e-5, rtol=1e-5)


def test_a_cancelled_row_leaves_at_once_and_frees_its_row(merged):
    model, tokenizer = merged
    streamed = {'n': 0}
    cancel_after = 6

    def stop_request_1():
        return streamed['n'] >= cancel_after

    requests = [REQUESTS[0], REQUESTS[2], REQUESTS[4], REQUESTS[5]]
    serial = [_serial(model, tokenizer, *request) for request in requests]
    scheduler = BatchScheduler(BatchDecoder(model.backbone, 3, GREEDY.context_length), tokenizer)
    results = {}
    for i, (prompt, seed, config) in enumerate(requests[:3]):
        def on_token(_event, i=i):
            if i == 0:
                streamed['n'] += 1
        scheduler.join(BatchRequest(tokenizer.encode(prompt, bos=True), config,
                                    on_done=lambda r, i=i: results.__setitem__(i, r), on_token=on_token,
                                    should_stop=stop_request_1 if i == 0 else (lambda: False),
                                    prepare=lambda seed=seed: model.set_visual_features(_features(seed))))
    for _ in range(cancel_after):
        scheduler.step()
    assert 0 in results and scheduler.running == 2 and scheduler.free == 1  # gone before the next forward
    assert results[0].stopped_reason == 'cancelled'
    assert results[0].token_ids == serial[0].token_ids[:cancel_after]
    prompt, seed, config = requests[3]  # the freed row takes a newcomer
    scheduler.join(BatchRequest(tokenizer.encode(prompt, bos=True), config,
                                on_done=lambda r: results.__setitem__(3, r),
                                prepare=lambda: model.set_visual_features(_features(seed))))
    for _ in range(100):
        if not scheduler.running:
            break
        scheduler.step()
    for i in (1, 2, 3):  # the others are unaffected by the cancellation and by the row's reuse
        assert results[i].token_ids == serial[i].token_ids, f'request {i}'


def test_seeded_sampling_is_reproducible_per_request_in_any_batch(merged):
    model, tokenizer = merged
    sampled = ('Describe the scene in front of the robot.', 1, replace(GREEDY, temperature=0.8, top_p=0.9, seed=7))
    alone = _serial(model, tokenizer, *sampled)
    assert alone.seed == 7
    company = [REQUESTS[0], sampled, (REQUESTS[2][0], 2, replace(GREEDY, temperature=1.0, top_p=0.95, seed=8))]
    first, _, _ = _batched(model, tokenizer, company, max_batch=3)
    second, _, _ = _batched(model, tokenizer, [sampled, REQUESTS[4]], max_batch=2, join_at=[4, 0])
    assert first[1].token_ids == second[0].token_ids == alone.token_ids
    assert first[1].seed == 7
    assert first[2].token_ids != first[0].token_ids


def test_eos_and_context_rules_are_those_of_the_serial_loop(merged):
    model, tokenizer = merged
    # A context just longer than the prompt: the budget is what is left of the context.
    short = replace(GREEDY, context_length=30, max_new_tokens=40)
    prompt = 'Is anyone speaking?'
    serial = _serial(model, tokenizer, prompt, 0, short)
    batched, _, _ = _batched(model, tokenizer, [(prompt, 0, short)], max_batch=2)
    assert serial.stopped_reason == batched[0].stopped_reason == 'context'
    assert batched[0].token_ids == serial.token_ids
    # EOS: a tokenizer whose EOS id is a token that greedy decoding produces a few tokens in.
    produced = _serial(model, tokenizer, prompt, None, GREEDY).token_ids
    eos_tokenizer = _WithEos(tokenizer, produced[5])
    eos_config = replace(GREEDY, stop_on_eos=True)
    serial = _serial(model, eos_tokenizer, prompt, None, eos_config)
    batched, _, _ = _batched(model, eos_tokenizer, [(prompt, None, eos_config), REQUESTS[0]], max_batch=2)
    assert serial.stopped_reason == batched[0].stopped_reason == 'eos'
    assert batched[0].token_ids == serial.token_ids == produced[:produced.index(produced[5])]
    assert batched[1].stopped_reason == 'max_new_tokens'  # its neighbour's EOS does not end it


class _WithEos:
    def __init__(self, tokenizer, eos_id):
        self._tokenizer, self.eos_id = tokenizer, eos_id

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@torch.inference_mode()
def test_a_shared_prompt_prefix_is_taken_from_another_row_only_under_the_same_visual_features(merged):
    """Concurrent askers share the system prompt and the perception context: a newcomer copies the keys and values
    of the longest common prefix from any row (running or finished) whose o_proj biases are its own, and runs only
    the rest; its logits and greedy tokens are those of a fresh prefill."""
    model, tokenizer = merged
    context = tokenizer.encode('Readings: nearest front 2.4 m, left none; text read: EXIT 3. Question:', bos=True)
    first = context + tokenizer.encode(' Is it safe?', bos=False)
    second = context + tokenizer.encode(' What text is there?', bos=False)
    decoder = BatchDecoder(model.backbone, 3, GREEDY.context_length)
    model.set_visual_features(_features(5))
    decoder.admit(0, first)
    assert decoder.reused == 0
    logits = decoder.admit(2, second)  # row 2 takes the context's slots from row 0
    assert decoder.reused == next(i for i, (a, b) in enumerate(zip(first, second)) if a != b) >= len(context)
    fresh = BatchDecoder(model.backbone, 3, GREEDY.context_length)
    reference = fresh.admit(2, second)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    for _ in range(20):  # greedy continuation of row 2 in both decoders
        token = int(reference.argmax())
        assert int(logits.argmax()) == token
        logits, reference = decoder.step([2], [token])[0], fresh.step([2], [token])[0]
    model.set_visual_features(_features(6))  # another query's visual vector: other keys and values, no reuse
    decoder.admit(1, second)
    assert decoder.reused == 0
    model.set_visual_features(_features(5))
    decoder.admit(0, second)  # row 2 holds this whole prompt: all of it but the last two tokens is reused
    assert decoder.reused == len(second) - 2


def test_an_unmerged_model_and_a_full_batch_are_refused(merged):
    model, tokenizer = merged
    unmerged = ImageBindLLM(tiny_random_backbone(seed=6).model, ImageBindLLMConfig(embed_dim=16, lora_rank=2))
    with pytest.raises(ConfigError, match='merge_adapters'):
        BatchDecoder(unmerged.backbone, 2, 64)
    scheduler = BatchScheduler(BatchDecoder(model.backbone, 1, 64), tokenizer)
    request = BatchRequest(tokenizer.encode('hi', bos=True), GREEDY, on_done=lambda _r: None)
    scheduler.join(request)
    with pytest.raises(ConfigError, match='busy'):
        scheduler.join(request)
