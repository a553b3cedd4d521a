"""Device and dtype selection: what the `device`/`dtype` parameters resolve to, and the warnings they give."""
import logging

import pytest
import torch

from mm_llm_ros.core import device as device_module
from mm_llm_ros.core.device import resolve_device, resolve_dtype
from mm_llm_ros.core.errors import DeviceError

CPU = torch.device('cpu')


def test_auto_is_float32_on_the_cpu():
    assert resolve_device('cpu') == CPU and resolve_dtype('auto', CPU) == torch.float32
    assert resolve_dtype('BFloat16 ', CPU) == torch.bfloat16


def test_bad_names_are_refused_with_the_choices():
    with pytest.raises(DeviceError, match='dtype must be one of auto, float32'):
        resolve_dtype('float64', CPU)
    with pytest.raises(DeviceError, match='device must be one of'):
        resolve_device('tpu')


def test_cuda_is_refused_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(DeviceError, match='CUDA is not available'):
        resolve_device('cuda:0')
    assert resolve_device('auto') == CPU


@pytest.mark.parametrize('native', [True, False])
def test_bfloat16_warns_only_where_the_cpu_emulates_it(monkeypatch, caplog, native):
    monkeypatch.setattr(device_module, 'cpu_has_native_bfloat16', lambda: native)
    with caplog.at_level(logging.WARNING, logger=device_module.__name__):
        assert resolve_dtype('bfloat16', CPU) == torch.bfloat16
    assert ('bfloat16 is emulated' in caplog.text) is not native
