#!/usr/bin/env python3
"""Tune the embedded default's grounded adapter: SmolLM2-135M learns to answer from its perception context.

    python scripts/tune_grounded_adapter.py                       # writes the bundled adapter (about 25 min, 2 cores)
    python scripts/tune_grounded_adapter.py --steps 20 --out /tmp/a.safetensors

Reads llm_node's settings from a parameter file (default config/demo.yaml: the prompt, the context format and
kinds), builds the embedded backbone with zero-initialised ImageBind-LLM additions, trains their LLaMA side
(LoRA, biases, norms; core/llm/tuning.py) on generated training pairs (core/evaluation/grounded_training.py:
other vocabularies, wordings and seeds than the grounded benchmark) and saves the language-side adapter in the
official key layout, float16, as safetensors with the settings in its metadata.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import subprocess
import sys
import time
from dataclasses import asdict, replace

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'mm_llm_ros'))

import torch  # noqa: E402

from mm_llm_ros.core.evaluation.grounded_training import (  # noqa: E402
    TRAINING_SEED, training_examples, training_pairs)
from mm_llm_ros.core.evaluation.model_predictor import ModelPredictorConfig  # noqa: E402
from mm_llm_ros.core.llm.adapters import BUNDLED_ADAPTERS, GROUNDED_ADAPTER  # noqa: E402
from mm_llm_ros.core.llm.assembly import build_imagebind_llm  # noqa: E402
from mm_llm_ros.core.llm.checkpoints import adapter_state_dict  # noqa: E402
from mm_llm_ros.core.llm.pipeline import prompt_builder  # noqa: E402
from mm_llm_ros.core.llm.tuning import TuningConfig, tune  # noqa: E402


def main() -> int:
    defaults = TuningConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', default=str(REPO / 'mm_llm_ros' / 'config' / 'demo.yaml'),
                        help="parameter file whose llm_node settings the prompts follow")
    parser.add_argument('--out', default=str(BUNDLED_ADAPTERS[GROUNDED_ADAPTER]), help='adapter file to write')
    parser.add_argument('--scenes', type=int, default=800, help='generated training scenes (about 8 pairs each)')
    parser.add_argument('--seed', type=int, default=TRAINING_SEED, help='training scene seed')
    parser.add_argument('--steps', type=int, default=defaults.steps)
    parser.add_argument('--accumulate', type=int, default=defaults.accumulate)
    parser.add_argument('--learning-rate', type=float, default=defaults.learning_rate)
    parser.add_argument('--kinds', default=','.join(defaults.kinds), help='parameter kinds to train')
    parser.add_argument('--threads', type=int, default=0, help='torch CPU threads (0: torch default)')
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    if args.threads:
        torch.set_num_threads(args.threads)

    llm = ModelPredictorConfig.from_params_file(args.config).llm
    # Train the plain float32 model with zero additions: no adapter, no quantisation, no merge.
    model_config = replace(llm.model, adapter_checkpoint='', quantization='none', dtype='float32', device='cpu')
    assembled = build_imagebind_llm(model_config, merge=False)
    model, tokenizer = assembled.model, assembled.tokenizer
    pairs = training_pairs(args.scenes, args.seed)
    examples = training_examples(pairs, llm, tokenizer, prompt_builder(llm, tokenizer))
    tokens = sum(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    logging.info('%d training pairs from %d scenes, %.0f tokens each on average', len(examples), args.scenes,
                 tokens / len(examples))
    config = replace(defaults, steps=args.steps, accumulate=args.accumulate, learning_rate=args.learning_rate,
                     kinds=tuple(args.kinds.split(',')))

    def report(step: int, loss: float, seconds: float) -> None:
        if step % 10 == 0 or step == config.steps - 1:
            logging.info('step %d/%d  loss %.4f  %.1f s/step', step + 1, config.steps, loss, seconds)

    started = time.perf_counter()
    losses = tune(model, examples, config, report)
    state = {key: value.to(torch.float16).contiguous() for key, value in
             adapter_state_dict(model, language_only=True).items()}
    metadata = {'format': 'ImageBind-LLM adapter, language side only (official keys)',
                'backbone': assembled.name, 'config': pathlib.Path(args.config).name,
                'tuning': json.dumps(asdict(config)), 'scenes': str(args.scenes), 'seed': str(args.seed),
                'pairs': str(len(examples)), 'first_loss': f'{losses[0]:.4f}',
                'last_loss': f'{sum(losses[-10:]) / len(losses[-10:]):.4f}',
                'minutes': f'{(time.perf_counter() - started) / 60:.1f}', 'commit': _commit()}
    from safetensors.torch import save_file

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=metadata)
    logging.info('wrote %s (%d tensors, %.1f MB): %s', out, len(state), out.stat().st_size / 1e6, metadata)
    return 0


def _commit() -> str:
    result = subprocess.run(['git', '-C', str(REPO), 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True)
    return result.stdout.strip() or 'unknown'


if __name__ == '__main__':
    sys.exit(main())
