"""The fast inference setup of ImageBind (`core/imagebind/inference.py`) keeps the official model's outputs.

Tiny preset, CPU, a checkpoint in the official key format. fp16 runs on this CPU build (convolution, SDPA and the
fused MHA kernel), so the half-precision check uses fp16, the dtype the GPU runs.
"""
import copy
import functools
import logging

import numpy as np
import pytest
import torch

from mm_llm_ros.core.imagebind import inference, model as model_module, official
from mm_llm_ros.core.imagebind.inference import prepare_for_inference
from mm_llm_ros.core.imagebind.model import ImageBindConfig, ImageBindEncoder
from mm_llm_ros.core.params import IMAGEBIND_PARAMS

MODALITIES = ('vision', 'audio', 'depth')
TINY = ImageBindConfig(preset='tiny', allow_random_weights=True, device='cpu')
# fp16 unit roundoff. Inputs and weights are rounded once, every op rounds its output once and the CPU/CUDA fp16
# kernels accumulate in fp32, so each op adds O(U16) relative error; LayerNorm renormalises the residual stream in
# every block, so the errors of the tiny model's ~25 roundings add up like a random walk (~5 U16), not
# multiplicatively. Measured: 1.3-2.1 U16. The bound leaves 2x margin over the random-walk estimate.
U16 = 2.0 ** -11
FP16_REL_BOUND = 10 * U16


def make_inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {'vision': torch.randn(batch, 3, 224, 224, generator=gen),
            'audio': torch.randn(batch, 3, 1, 128, 204, generator=gen),
            'depth': torch.randn(batch, 1, 224, 224, generator=gen)}


@pytest.fixture(scope='module')
def inputs():
    return make_inputs()


@pytest.fixture(scope='module')
def reference():
    """The published ImageBindModel (tiny arguments, own weights), untouched: the ground truth."""
    torch.manual_seed(123)
    return official.model_class()(**TINY.model_kwargs()).eval().requires_grad_(False)


@pytest.fixture(scope='module')
def expected(reference, inputs):
    with torch.inference_mode():
        return {m: v.numpy() for m, v in reference(inputs).items()}


@pytest.fixture(scope='module')
def checkpoint(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp('ckpt') / 'imagebind_tiny.pth'
    torch.save(reference.state_dict(), path)
    return path


def run(model: torch.nn.Module, inputs, dtype=torch.float32) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        return {m: v.float().numpy() for m, v in model({k: x.to(dtype) for k, x in inputs.items()}).items()}


def assert_close(actual, expected, atol=1e-5):
    for m in expected:
        np.testing.assert_allclose(actual[m], expected[m], rtol=0, atol=atol, err_msg=m)


# --- (a) fp32: the official embeddings -----------------------------------------------------------------------------


def test_fast_setup_gives_the_official_embeddings_in_fp32(reference, inputs, expected):
    fast = copy.deepcopy(reference)
    setup = prepare_for_inference(fast, batch_first=True, channels_last=True)  # CUDA-only by default: force here
    assert setup.batch_first_trunks == ('vision',) and setup.channels_last  # the others have bias_k or a mask
    assert_close(run(fast, inputs), expected)
    assert fast.state_dict().keys() == reference.state_dict().keys()  # same weights, same names


def test_encoder_with_official_checkpoint_is_prepared_and_exact(checkpoint, inputs, expected):
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(checkpoint), device='cpu'))
    assert encoder.inference_setup.batch_first_trunks == ()  # on CPU the fused kernel is slower: not by default
    assert_close(encoder.encode(inputs), expected)


def test_vision_takes_the_fused_attention_kernel_and_others_keep_sdpa(reference, inputs, monkeypatch):
    """Why the setup is faster: the native MHA fast path runs for vision (no bias_k), never for the official
    sequence-first layout."""
    calls = []
    native = torch._native_multi_head_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return native(*args, **kwargs)

    monkeypatch.setattr(torch, '_native_multi_head_attention', counting)
    run(reference, inputs)
    assert calls == []
    fast = copy.deepcopy(reference)
    prepare_for_inference(fast, batch_first=True)
    run(fast, {'vision': inputs['vision']})
    assert len(calls) == len(fast.modality_trunks['vision'].blocks)
    calls.clear()
    run(fast, {'audio': inputs['audio'], 'depth': inputs['depth']})  # add_bias_kv=True: SDPA path as before
    assert calls == []


def test_prepare_is_idempotent(reference, inputs, expected):
    fast = copy.deepcopy(reference)
    prepare_for_inference(fast, batch_first=True, channels_last=True)
    again = prepare_for_inference(fast, batch_first=True, channels_last=True)
    assert again.batch_first_trunks == ('vision',) and not again.notes
    assert_close(run(fast, inputs), expected)


# --- (b) fp16 within fp16 rounding of fp32 ---------------------------------------------------------------------------


def assert_within_fp16_rounding(got, expected):
    for m in MODALITIES:
        assert got[m].dtype == np.float32, m  # embeddings come back as float32, as in fp32
        a, b = expected[m], got[m]
        rel = np.linalg.norm(b - a, axis=-1) / np.linalg.norm(a, axis=-1)
        cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert rel.max() <= FP16_REL_BOUND, (m, rel.max() / U16)
        assert cos.min() >= 0.999, (m, cos.min())


def test_fp16_stays_within_fp16_rounding(checkpoint, inputs, expected):
    """The whole encoder path in fp16 (float32 inputs cast on the way in, float32 embeddings out), as set up for
    CPU and then with every step of the CUDA setup forced on."""
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(checkpoint), device='cpu',
                                               dtype='float16'))
    assert {p.dtype for p in encoder._model.parameters()} == {torch.float16}
    assert_within_fp16_rounding(encoder.encode(inputs), expected)
    prepare_for_inference(encoder._model, batch_first=True, channels_last=True)
    assert_within_fp16_rounding(encoder.encode(inputs), expected)


# --- (c) torch.compile: works, or falls back with the reason logged --------------------------------------------------


def test_compile_option_is_a_declared_parameter():
    param = next(p for p in IMAGEBIND_PARAMS if p.name == 'model.compile')
    assert param.default is False and 'torch.compile' in param.description
    values = {p.name: p.default for p in IMAGEBIND_PARAMS} | {'device': 'cpu', 'dtype': 'auto', 'model.compile': True}
    assert ImageBindConfig.from_params(values).compile is True


def test_compiled_blocks_keep_the_outputs(reference, inputs, expected, caplog):
    """The real toolchain (inductor: a C++ compiler on CPU, triton on CUDA) on one warm-up: it compiles and gives
    the same embeddings, or it falls back to eager and says why."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip(f'torch.compile cannot run here at all (torch {torch.__version__})')
    fast = copy.deepcopy(reference)
    with caplog.at_level(logging.WARNING, logger=inference.__name__):
        setup = prepare_for_inference(fast, batch_first=True, compile=True, warmup={'vision': inputs['vision'][:1]})
    if setup.compiled:
        assert_close(run(fast, {'vision': inputs['vision']}), {'vision': expected['vision']})
    else:
        assert 'torch.compile is not possible here' in caplog.text and setup.notes, caplog.text
        assert_close(run(fast, inputs), expected)


def test_compile_failure_falls_back_to_eager_with_the_reason(reference, inputs, expected, caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError('no compiler on this robot')

    fast = copy.deepcopy(reference)
    with caplog.at_level(logging.WARNING, logger=inference.__name__):
        setup = prepare_for_inference(fast, compile=True, warmup={'vision': inputs['vision'][:1]},
                                      compile_backend=broken_backend)
    assert not setup.compiled
    assert 'no compiler on this robot' in caplog.text and 'running eager' in caplog.text
    assert all(block._compiled_call_impl is None for block in inference._blocks(fast))
    assert_close(run(fast, inputs), expected)


def test_compile_without_warmup_inputs_falls_back(reference, caplog):
    with caplog.at_level(logging.WARNING, logger=inference.__name__):
        setup = prepare_for_inference(copy.deepcopy(reference), compile=True)
    assert not setup.compiled and 'no warm-up inputs' in caplog.text


def test_encoder_compiles_on_its_warmup_batch(checkpoint, inputs, expected, monkeypatch):
    """`model.compile` reaches the setup with a warm-up batch of every sensor modality (dynamo only, to stay fast)."""
    monkeypatch.setattr(model_module, 'prepare_for_inference',
                        functools.partial(prepare_for_inference, compile_backend='eager'))
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(checkpoint), device='cpu', compile=True))
    assert encoder.inference_setup.compiled
    assert_close(encoder.encode(inputs), expected)


# --- (d) CUDA graphs: a CUDA-only optimisation that the CPU never takes ------------------------------------------------


def test_cuda_graphs_are_a_declared_parameter_on_by_default():
    param = next(p for p in IMAGEBIND_PARAMS if p.name == 'model.cuda_graphs')
    assert param.default is True and 'CUDA graph' in param.description
    values = {p.name: p.default for p in IMAGEBIND_PARAMS} | {'device': 'cpu', 'dtype': 'auto',
                                                              'model.cuda_graphs': False}
    assert ImageBindConfig.from_params(values).cuda_graphs is False


def test_graphed_forward_refuses_a_cpu_model(reference):
    with pytest.raises(ValueError, match='CUDA graphs need a model on a CUDA device, this one is on cpu'):
        inference.GraphedForward(reference)


def test_encoder_on_the_cpu_runs_eager_with_cuda_graphs_on(checkpoint, inputs, expected):
    encoder = ImageBindEncoder(ImageBindConfig(preset='tiny', checkpoint=str(checkpoint), device='cpu'))
    assert encoder.config.cuda_graphs and encoder._forward is encoder._model
    assert not any('CUDA graphs' in note for note in encoder.inference_setup.notes)
    assert_close(encoder.encode(inputs), expected)


def test_graph_signature_tells_shapes_dtypes_and_modalities_apart():
    sig = inference.GraphedForward.signature
    one = {'vision': torch.zeros(1, 3, 4, 4)}
    assert sig(one) == sig({'vision': torch.ones(1, 3, 4, 4)})  # values do not matter: they are copied in
    assert len({sig(one), sig({'vision': torch.zeros(2, 3, 4, 4)}), sig({'vision': torch.zeros(1, 3, 4, 4).half()}),
                sig({**one, 'depth': torch.zeros(1, 1, 4, 4)})}) == 4
    assert sig({'a': torch.zeros(1), 'b': torch.zeros(2)}) == sig({'b': torch.zeros(2), 'a': torch.zeros(1)})
