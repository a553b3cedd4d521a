"""Benchmark evaluation (MME, TextVQA, MMBench) with metrics that follow the official evaluation code.

Typical use (what the `evaluate` CLI does)::

    items = select_items(load_benchmark('mme', root), limit=100)
    run = run_predictions(predictor, items, config='base', cache=PredictionCache(out / 'predictions.jsonl', 'mme'))
    score = score_benchmark('mme', items, run.predictions)
"""
from .datasets import (BENCHMARKS, MME_COGNITION, MME_PERCEPTION, MME_SUBTASKS, DatasetError, EvalItem,
                       expand_circular, load_benchmark, load_jsonl, load_mmbench_tsv, load_mme, load_textvqa,
                       rotate_options)
from .metrics import (VQA_PROTOCOLS, BenchmarkScore, ItemScore, MetricError, extract_choice, mmbench_score,
                      mme_score, normalize_vqa_answer, parse_yes_no, score_benchmark, textvqa_score, vqa_accuracy)
from .report import (ReportError, markdown_table, plot_categories, results_document, write_details, write_json,
                     write_mme_eval_tool)
from .runner import (BUILTIN_PREDICTORS, ConstantPredictor, FirstOptionPredictor, PredictionCache, PredictionError,
                     PredictionRun, Predictor, SelectionError, run_configs, run_predictions, select_items)

__all__ = [
    'BENCHMARKS', 'MME_COGNITION', 'MME_PERCEPTION', 'MME_SUBTASKS', 'DatasetError', 'EvalItem', 'expand_circular',
    'load_benchmark', 'load_jsonl', 'load_mmbench_tsv', 'load_mme', 'load_textvqa', 'rotate_options',
    'VQA_PROTOCOLS', 'BenchmarkScore', 'ItemScore', 'MetricError', 'extract_choice', 'mmbench_score', 'mme_score',
    'normalize_vqa_answer', 'parse_yes_no', 'score_benchmark', 'textvqa_score', 'vqa_accuracy',
    'ReportError', 'markdown_table', 'plot_categories', 'results_document', 'write_details', 'write_json',
    'write_mme_eval_tool',
    'BUILTIN_PREDICTORS', 'ConstantPredictor', 'FirstOptionPredictor', 'PredictionCache', 'PredictionError',
    'PredictionRun', 'Predictor', 'SelectionError', 'run_configs', 'run_predictions', 'select_items',
]
