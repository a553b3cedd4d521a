"""Evaluation outputs: results JSON, per-item details, a side-by-side markdown table, a per-category bar chart
and MME's official eval_tool input files (to cross-check our scores with the official script)."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .datasets import EvalItem
from .metrics import BenchmarkScore

logger = logging.getLogger(__name__)

_TITLES = {'mme': 'MME', 'textvqa': 'TextVQA', 'mmbench': 'MMBench', 'grounded': 'Grounded answers'}
# Per-category scale of the headline metric (MME subtask scores are acc + acc+ in percent).
_Y_LIMITS = {'score': 200.0, 'accuracy': 100.0, 'circular_accuracy': 100.0}


class ReportError(RuntimeError):
    """A report that cannot be produced (e.g. matplotlib missing for the chart)."""


def results_document(scores: Mapping[str, BenchmarkScore], meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """JSON-ready results: `{'benchmark', 'meta', 'configs': {name: score without per-item rows}}`."""
    benchmark = _benchmark(scores)
    return {'benchmark': benchmark, 'meta': dict(meta or {}),
            'configs': {name: score.to_dict() for name, score in scores.items()}}


def write_json(path: str | Path, scores: Mapping[str, BenchmarkScore],
               meta: Mapping[str, Any] | None = None) -> Path:
    path = Path(path)
    path.write_text(json.dumps(results_document(scores, meta), indent=2, ensure_ascii=False) + '\n',
                    encoding='utf-8')
    return path


def write_details(path: str | Path, scores: Mapping[str, BenchmarkScore]) -> Path:
    """One JSON line per (config, item): raw prediction, how it was parsed and its score."""
    path = Path(path)
    with path.open('w', encoding='utf-8') as handle:
        for config, score in scores.items():
            for item in score.items:
                row = {'config': config, 'id': item.item_id, 'category': item.category,
                       'prediction': item.prediction, 'parsed': item.parsed, 'score': item.score}
                handle.write(json.dumps(row, ensure_ascii=False) + '\n')
    return path


def markdown_table(scores: Mapping[str, BenchmarkScore]) -> str:
    """Side-by-side markdown table: one column per configuration, plus a delta column per configuration after
    the first (relative to the first). Rows: headline numbers (bold), per-category metric, then counts."""
    benchmark = _benchmark(scores)
    names = list(scores)
    first = scores[names[0]]
    deltas = names[1:]
    header = ['metric', *names, *(f'Δ {name}' for name in deltas)]
    lines = [f'### {_TITLES.get(benchmark, benchmark)}', '',
             '| ' + ' | '.join(header) + ' |', '|:--' + '|--:' * (len(header) - 1) + '|']

    def row(label: str, values: list[float | None], digits: int = 2) -> None:
        cells = [_fmt(v, digits) for v in values]
        cells += [_fmt(None if v is None or values[0] is None else v - values[0], digits, signed=True)
                  for v in values[1:]]
        lines.append('| ' + ' | '.join([label, *cells]) + ' |')

    for key in first.summary:
        row(f'**{key}**', [scores[n].summary.get(key) for n in names])
    for category in first.categories:
        row(f'{category} ({first.headline})', [scores[n].categories.get(category, {}).get(first.headline)
                                               for n in names])
    for key in first.counts:
        row(key, [scores[n].counts.get(key) for n in names], digits=0)
    return '\n'.join(lines) + '\n'


def _fmt(value: float | None, digits: int, *, signed: bool = False) -> str:
    if value is None:
        return '—'
    return f'{value:+.{digits}f}' if signed else f'{value:.{digits}f}'


def plot_categories(scores: Mapping[str, BenchmarkScore], path: str | Path) -> Path:
    """Grouped bar chart of the per-category headline metric, one bar colour per configuration (PNG).

    matplotlib is imported here, with the Agg canvas and no pyplot, so the rest of the package works without it
    and no global backend is changed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ReportError(f'the bar chart needs matplotlib (pip install matplotlib): {exc}') from None
    benchmark = _benchmark(scores)
    names = list(scores)
    headline = scores[names[0]].headline
    categories = list(scores[names[0]].categories)
    if not categories:
        raise ReportError(f'{benchmark} results have no categories to plot')

    width = 0.8 / len(names)
    figure = Figure(figsize=(max(6.0, 0.6 * len(categories) * max(1, len(names) / 2) + 2), 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for offset, name in enumerate(names):
        values = [scores[name].categories.get(c, {}).get(headline, 0.0) for c in categories]
        positions = [i + (offset - (len(names) - 1) / 2) * width for i in range(len(categories))]
        axes.bar(positions, values, width, label=name)
    axes.set_xticks(range(len(categories)), categories, rotation=40, ha='right', fontsize=8)
    axes.set_ylabel(headline.replace('_', ' '))
    axes.set_ylim(0, _Y_LIMITS.get(headline))
    axes.set_title(f'{_TITLES.get(benchmark, benchmark)}: {headline.replace("_", " ")} per category')
    axes.grid(axis='y', alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    return path


def write_mme_eval_tool(items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: str | Path) -> Path:
    """Write `<out_dir>/<subtask>.txt` in the input format of MME's official `calculation.py`.

    Lines are `image<TAB>question<TAB>Yes|No<TAB>prediction`, the two questions of an image adjacent (the
    official tool reads them in pairs); tabs and newlines in predictions become spaces.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_subtask: dict[str, list[str]] = {}
    for item in sorted(items, key=lambda i: (i.category, i.group)):
        prediction = predictions[item.id].replace('\t', ' ').replace('\n', ' ')
        image = item.metadata.get('image_name') or (item.image_path.name if item.image_path else item.group)
        by_subtask.setdefault(item.category, []).append(
            f'{image}\t{item.question}\t{item.answers[0].capitalize()}\t{prediction}')
    for subtask, lines in by_subtask.items():
        (out_dir / f'{subtask}.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return out_dir


def _benchmark(scores: Mapping[str, BenchmarkScore]) -> str:
    if not scores:
        raise ReportError('no results to report')
    benchmarks = {score.benchmark for score in scores.values()}
    if len(benchmarks) != 1:
        raise ReportError(f'cannot tabulate different benchmarks side by side: {sorted(benchmarks)}')
    return benchmarks.pop()
