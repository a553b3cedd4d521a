"""scripts/tune_grounded_adapter.py end to end on the embedded backbone: a few steps, a file that loads."""
import json
import pathlib
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from mm_llm_ros.core.evaluation.model_predictor import ModelPredictorConfig
from mm_llm_ros.core.llm.assembly import build_imagebind_llm
from mm_llm_ros.core.llm.checkpoints import adapter_state_dict

REPO = pathlib.Path(__file__).resolve().parents[3]
SCRIPT = REPO / 'scripts' / 'tune_grounded_adapter.py'


@pytest.mark.slow
def test_script_tunes_and_writes_an_adapter_the_node_loads(tmp_path):
    from safetensors import safe_open

    out = tmp_path / 'grounded.safetensors'
    done = subprocess.run([sys.executable, str(SCRIPT), '--steps', '2', '--scenes', '2', '--accumulate', '1',
                           '--out', str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with safe_open(str(out), 'pt') as adapter:
        metadata = adapter.metadata()
        saved = {key: adapter.get_tensor(key) for key in adapter.keys()}
    assert json.loads(metadata['tuning'])['steps'] == 2 and metadata['backbone'] == 'SmolLM2-135M-Instruct'
    assert all(key.startswith('llama.') and value.dtype == torch.float16 for key, value in saved.items())
    # Tuned: the zero-initialised LoRA up factors moved.
    assert saved['llama.layers.0.attention.lora_wq_l2.weight'].abs().sum() > 0

    llm = ModelPredictorConfig.from_params_file(REPO / 'mm_llm_ros' / 'config' / 'demo.yaml').llm
    model = build_imagebind_llm(replace(llm.model, adapter_checkpoint=str(out), quantization='none'),
                                merge=False).model
    loaded = adapter_state_dict(model, language_only=True)
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[key].half(), saved[key]) for key in saved)
