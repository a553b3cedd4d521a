"""`evaluate`: run configurations side by side on MME, TextVQA, MMBench or the grounded benchmark and write JSON,
markdown and a chart.

    evaluate --benchmark mme --data MME_Benchmark_release_version --config base=config/robot.yaml \\
             --config ocr=config/robot.yaml+ocr --out results/mme [--limit N] [--subset OCR,count]
    evaluate --smoke --data shared/data/vqa/questions.jsonl --out /tmp/smoke
    evaluate --benchmark grounded --data ../shared/data --config new=config/demo.yaml --out results/grounded

A config is NAME=PARAMS[+ocr]: PARAMS is a ROS 2 parameter file of the nodes (its encoder or camera_encoder,
llm_node and grounding_node sections build the same ImageBind and LLM as the nodes), and `+ocr` adds the grounding
node's OCR of each image to the prompt as llm_node does; or PARAMS is `builtin:<name>` for a deterministic
baseline (first-option, always-yes, always-no). Predictions are cached in OUT/predictions.jsonl, so an interrupted
run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mm_llm_ros.core.errors import ConfigError, StartupError
from mm_llm_ros.core.evaluation import (BENCHMARKS, BUILTIN_PREDICTORS, VQA_PROTOCOLS, DatasetError, MetricError,
                                        PredictionCache, PredictionError, Predictor, ReportError, SelectionError,
                                        load_benchmark, markdown_table, plot_categories, run_configs,
                                        score_benchmark, select_items, write_details, write_json,
                                        write_mme_eval_tool)
from mm_llm_ros.core.llm.adapters import BUNDLED_ADAPTERS
from mm_llm_ros.core.params import CONTEXT_KINDS

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = 'builtin:'
CONTEXT_SEPARATOR = '+'
SMOKE_LIMIT = 4
_CONFIG_NAME = re.compile(r'[A-Za-z0-9_.-]+')


@dataclass(frozen=True)
class ConfigSpec:
    """One `--config NAME=PARAMS[+context...]` argument."""

    name: str
    params: str
    context: tuple[str, ...] = ()

    @property
    def is_builtin(self) -> bool:
        return self.params.startswith(BUILTIN_PREFIX)

    @property
    def label(self) -> str:
        """PARAMS as written on the command line, context suffixes included."""
        return CONTEXT_SEPARATOR.join((self.params, *self.context))

    def fingerprint(self) -> str:
        """Identifies the configuration's settings, so cached predictions of edited params are not reused."""
        if self.is_builtin:
            return self.label
        content = Path(self.params).read_bytes()
        hasher = hashlib.sha256(content)
        for name, path in BUNDLED_ADAPTERS.items():   # a retrained bundled adapter changes the answers too
            if name.encode() in content and path.is_file():
                hasher.update(path.read_bytes())
        return CONTEXT_SEPARATOR.join(('sha256:' + hasher.hexdigest()[:16], *self.context))


def parse_config(text: str) -> ConfigSpec:
    name, sep, params = text.partition('=')
    if not sep or not params:
        raise argparse.ArgumentTypeError(f'expected NAME=PARAMS_YAML[+ocr] or NAME=builtin:<name>, got {text!r}')
    if not _CONFIG_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f'config name {name!r} may only use letters, digits, _ . -')
    # Trailing '+<kind>' parts name perception context; any other '+' belongs to the file name.
    parts = params.split(CONTEXT_SEPARATOR)
    context: list[str] = []
    while len(parts) > 1 and parts[-1] in CONTEXT_KINDS:
        context.insert(0, parts.pop())
    return ConfigSpec(name, CONTEXT_SEPARATOR.join(parts), tuple(context))


def make_predictor(name: str, params_file: Path, context: Sequence[str] = ()) -> Predictor:
    """The model predictor of configuration `name`: the nodes' ImageBind encoder and LLM as `params_file`
    configures them, with the perception `context` kinds (e.g. 'ocr') added to the prompt.

    Settings are checked now; the models load on the first prediction (and are shared between configurations).
    """
    # Imported here: torch and transformers load only when a model configuration is evaluated.
    from mm_llm_ros.core.evaluation.model_predictor import ModelPredictor, ModelPredictorConfig

    try:
        return ModelPredictor(ModelPredictorConfig.from_params_file(params_file, context))
    except (ValueError, StartupError) as exc:  # ParamsFileError, or any StartupError (a missing package too)
        raise ConfigError(f'config {name!r} ({params_file}): {exc}') from exc


def resolve_predictor(spec: ConfigSpec) -> Predictor:
    if spec.is_builtin:
        builtin = spec.params.removeprefix(BUILTIN_PREFIX)
        if builtin not in BUILTIN_PREDICTORS:
            raise ConfigError(f'config {spec.name!r}: unknown builtin {builtin!r}, '
                              f'expected one of {", ".join(BUILTIN_PREDICTORS)}')
        if spec.context:
            raise ConfigError(f'config {spec.name!r}: builtin baselines take no context (+{"+".join(spec.context)})')
        return BUILTIN_PREDICTORS[builtin]()
    params_file = Path(spec.params)
    if not params_file.is_file():
        raise ConfigError(f'config {spec.name!r}: params file not found: {params_file}')
    return make_predictor(spec.name, params_file, spec.context)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='evaluate', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--benchmark', choices=BENCHMARKS, help='benchmark to score (default with --smoke: mmbench)')
    parser.add_argument('--data', type=Path, required=True,
                        help='MME release folder, TextVQA JSON, MMBench TSV, or a questions .jsonl for any benchmark; '
                             'grounded: the sample-data folder (shared/data, adds its real scenes) or "generated"')
    parser.add_argument('--config', dest='configs', type=parse_config, action='append', default=[],
                        metavar='NAME=PARAMS', help='configuration to evaluate (repeat to compare side by side): '
                        'a params YAML, optionally +ocr for OCR context, or builtin:<name>')
    parser.add_argument('--out', type=Path, required=True, help='output folder (results + prediction cache)')
    parser.add_argument('--limit', type=int, help='first N items only (rounded up to whole image pairs/rotations)')
    parser.add_argument('--subset', nargs='+', metavar='CATEGORY',
                        help='only these subtasks/categories (space or comma separated)')
    parser.add_argument('--circular', action='store_true',
                        help='MMBench CircularEval: ask every rotation of the options, right only if all are right')
    parser.add_argument('--image-dir', type=Path, help='TextVQA image folder (default: train_images/ by the JSON)')
    parser.add_argument('--vqa-protocol', choices=VQA_PROTOCOLS, default='evalai',
                        help='TextVQA answer matching: evalai (default) = the TextVQA authors\' M4C evaluator, as '
                             'published TextVQA numbers are scored (LLaVA-style papers); vqa = VQAv2\'s '
                             'GT-Vision-Lab vqaEval.py rules')
    parser.add_argument('--smoke', action='store_true',
                        help=f'quick end-to-end check on a questions.jsonl: first {SMOKE_LIMIT} questions, '
                             'builtin first-option config unless --config is given')
    parser.add_argument('--no-plot', action='store_true', help='skip the per-category bar chart')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    parser.add_argument('--log-level', default='INFO', choices=('DEBUG', 'INFO', 'WARNING', 'ERROR'))
    return parser


def _apply_smoke_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.smoke:
        if args.data.suffix != '.jsonl':
            parser.error('--smoke expects --data to be a questions .jsonl file')
        args.benchmark = args.benchmark or 'mmbench'
        args.limit = args.limit or SMOKE_LIMIT
        args.configs = args.configs or [ConfigSpec('first-option', BUILTIN_PREFIX + 'first-option')]
    if args.benchmark is None:
        parser.error('--benchmark is required (unless --smoke)')
    if not args.configs:
        parser.error('give at least one --config NAME=PARAMS')
    names = [spec.name for spec in args.configs]
    if len(set(names)) != len(names):
        parser.error(f'config names must be unique, got {", ".join(names)}')


def run(args: argparse.Namespace) -> str:
    """Evaluate every configuration and write the report files; returns the markdown table."""
    items = load_benchmark(args.benchmark, args.data, circular=args.circular, image_dir=args.image_dir)
    items = select_items(items, subset=args.subset, limit=args.limit)
    predictors = {spec.name: resolve_predictor(spec) for spec in args.configs}
    args.out.mkdir(parents=True, exist_ok=True)
    cache = PredictionCache(args.out / 'predictions.jsonl', args.benchmark)
    runs = run_configs(predictors, items, cache=cache, progress=not args.no_progress,
                       fingerprints={spec.name: spec.fingerprint() for spec in args.configs})
    scores = {name: score_benchmark(args.benchmark, items, r.predictions, vqa_protocol=args.vqa_protocol)
              for name, r in runs.items()}

    meta = {'created': datetime.now(UTC).isoformat(timespec='seconds'), 'data': str(args.data),
            'items': len(items), 'limit': args.limit, 'subset': args.subset, 'circular': args.circular,
            'vqa_protocol': args.vqa_protocol if args.benchmark == 'textvqa' else None,
            'configs': {spec.name: spec.label for spec in args.configs},
            'models': {spec.name: getattr(predictors[spec.name], 'description', spec.label)
                       for spec in args.configs},
            'runs': {name: {'new': r.new, 'cached': r.cached, 'seconds': round(r.seconds, 3),
                            'seconds_per_item': round(r.seconds_per_item, 3)} for name, r in runs.items()}}
    write_json(args.out / 'results.json', scores, meta)
    write_details(args.out / 'details.jsonl', scores)
    table = markdown_table(scores)
    (args.out / 'results.md').write_text(table, encoding='utf-8')
    if args.benchmark == 'mme':
        for name, r in runs.items():
            write_mme_eval_tool(items, r.predictions, args.out / 'mme_eval_tool' / name)
    if not args.no_plot and any(score.categories for score in scores.values()):
        try:
            plot_categories(scores, args.out / f'{args.benchmark}_categories.png')
        except ReportError as exc:
            logger.warning('no chart: %s', exc)
    logger.info('results written to %s', args.out)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _apply_smoke_defaults(args, parser)
    logging.basicConfig(level=args.log_level, format='%(levelname)s %(name)s: %(message)s')
    try:
        table = run(args)
    except (ConfigError, DatasetError, SelectionError, PredictionError, MetricError, OSError) as exc:
        logger.error('%s', exc)
        return 1
    print(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
