"""Benchmark loaders: MME, TextVQA, MMBench (TSV) and a generic JSONL layout, all yielding `EvalItem`s.

Supported layouts (see docs/evaluation.md for the full description):

* MME, official release (`MME_Benchmark_release_version/`, optionally with an inner `MME_Benchmark/`): one folder
  per subtask. Five subtasks (artwork, celebrity, landmark, posters, scene) keep images in `images/` and one
  `<image stem>.txt` per image in `questions_answers_YN/`; the other nine keep `<stem>.jpg|png` and `<stem>.txt`
  side by side. Each txt holds two lines `question<TAB>Yes|No`.
  Also accepted: the eval_tool list layout, `<root>/<subtask>.txt` with lines `image<TAB>question<TAB>Yes|No`,
  images looked up in `<root>/<subtask>/` or `<root>/<subtask>/images/`.
* TextVQA official JSON (`TextVQA_0.5.1_val.json`): `{"data": [{"question_id", "question", "image_id",
  "answers": [10 strings]}, ...]}`, images `<image dir>/<image_id>.jpg` (default: `train_images/` next to the JSON,
  where the official archive puts the val images). Optional Rosetta OCR JSON adds `metadata['ocr_tokens']`.
* MMBench TSV (VLMEvalKit / open-compass release): columns `index, question, hint, A..E, answer, category,
  l2-category, image` with the image base64-encoded, or a short integer naming the row whose image it reuses.
  Rows with `index >= 1e6` are the circular copies of question `index % 1e6`.
* JSONL, one question per line (like shared/data/vqa/questions.jsonl): `image` (path relative to the file),
  `question`, optional `hint`, `options` (letter -> text), `answers` (list) or `answer`, `category`, and optional
  `id`/`index` and `group` (items scored together, e.g. the two MME questions of one image).
"""
from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BENCHMARKS = ('mme', 'textvqa', 'mmbench', 'grounded')
# `--data generated` for the grounded benchmark: generated scenes only, no sample-data folder.
GENERATED_ONLY = 'generated'

MME_PERCEPTION = ('existence', 'count', 'position', 'color', 'posters', 'celebrity', 'scene', 'landmark',
                  'artwork', 'OCR')
MME_COGNITION = ('commonsense_reasoning', 'numerical_calculation', 'text_translation', 'code_reasoning')
MME_SUBTASKS = MME_PERCEPTION + MME_COGNITION

# VLMEvalKit stores circular copy k of question i as index i + k * 1e6.
MMBENCH_CIRCULAR_OFFSET = 1_000_000

_IMAGE_SUFFIXES = ('.jpg', '.png', '.jpeg', '.JPG', '.PNG', '.JPEG', '.bmp')
_MMBENCH_OPTION_COLUMNS = tuple('ABCDEFGHIJKLMNOPQRSTUVWXYZ')


class DatasetError(ValueError):
    """A benchmark file or folder that does not have the expected layout."""


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question.

    `answers` holds the ground truth: ('yes',) or ('no',) for MME, the 10 human answers for TextVQA, the correct
    option letter for MMBench. Items sharing a `group` are scored together (the two questions of one MME image, the
    circular rotations of one MMBench question); `group` defaults to `id`. `rotation` is the circular shift of the
    options (0 for the question as published).
    """

    id: str
    question: str
    answers: tuple[str, ...]
    category: str = ''
    group: str = ''
    options: Mapping[str, str] = field(default_factory=dict)
    hint: str | None = None
    image_path: Path | None = None
    image_bytes: bytes | None = field(default=None, repr=False)
    rotation: int = 0
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.id:
            raise DatasetError('an evaluation item needs a non-empty id')
        if not self.group:
            object.__setattr__(self, 'group', self.id)

    def load_image(self):
        """Decode the item's image as an RGB `PIL.Image` (Pillow is imported on first use)."""
        from PIL import Image

        if self.image_bytes is not None:
            source = io.BytesIO(self.image_bytes)
        elif self.image_path is not None:
            source = self.image_path
        else:
            raise DatasetError(f'item {self.id} has no image')
        with Image.open(source) as image:
            return image.convert('RGB')


def load_benchmark(benchmark: str, path: str | Path, *, circular: bool = False,
                   image_dir: str | Path | None = None) -> list[EvalItem]:
    """Load `benchmark` items from `path`; a `.jsonl` file uses the generic JSONL layout for any benchmark.

    `circular` (MMBench only) keeps or builds the circular rotations of every question; without it the rotation
    copies of a VLMEvalKit TSV are dropped (vanilla, single-pass evaluation).
    """
    path: Path | None = Path(path)
    if benchmark not in BENCHMARKS:
        raise DatasetError(f"unknown benchmark '{benchmark}', expected one of {', '.join(BENCHMARKS)}")
    if circular and benchmark != 'mmbench':
        raise DatasetError('circular evaluation only applies to multiple-choice benchmarks (mmbench)')
    if benchmark == 'grounded' and str(path) == GENERATED_ONLY:
        path = None
    elif not path.exists():
        raise DatasetError(f'{benchmark} data not found: {path}')
    if benchmark == 'grounded':   # generated scenes, plus the real ones of the sample-data folder `path`
        from .grounded import load_grounded
        if path is not None and not path.is_dir():
            raise DatasetError(f'grounded: --data must be the sample-data folder (shared/data) or '
                               f'{GENERATED_ONLY!r}, got {path}')
        items = load_grounded(path)
    elif path.suffix == '.jsonl':
        items = load_jsonl(path)
    elif benchmark == 'mme':
        items = load_mme(path)
    elif benchmark == 'textvqa':
        items = load_textvqa(path, image_dir=image_dir)
    else:
        items = load_mmbench_tsv(path)
    if benchmark == 'mmbench':
        items = _apply_circular_policy(items, circular)
    logger.info('loaded %d %s items from %s', len(items), benchmark, path)
    return items


# --------------------------------------------------------------------------------------------------- MME


def load_mme(root: str | Path) -> list[EvalItem]:
    """Load the official MME release folder (or the eval_tool list layout); subtasks in the official order.

    Item ids are `<subtask>/<image name>#<k>`, k counting the questions of one image in file order.
    """
    root = _mme_root(Path(root))
    items: list[EvalItem] = []
    missing = []
    for subtask in MME_SUBTASKS:
        folder = root / subtask
        listing = root / f'{subtask}.txt'
        if listing.is_file():
            questions = _read_mme_listing(listing, folder)
        elif folder.is_dir():
            questions = _read_mme_release_subtask(folder)
        else:
            missing.append(subtask)
            continue
        items.extend(_mme_items(subtask, questions))
    if len(missing) == len(MME_SUBTASKS):
        raise DatasetError(f'no MME subtask folder or list file found in {root} (expected e.g. {root / "existence"})')
    if missing:
        logger.warning('MME subtasks missing from %s: %s (perception/cognition totals cover the rest only)',
                       root, ', '.join(missing))
    return items


def _mme_root(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f'MME data must be a folder, got {root}')
    # Later releases nest the subtask folders one level down.
    nested = root / 'MME_Benchmark'
    if not any((root / s).exists() or (root / f'{s}.txt').exists() for s in MME_SUBTASKS) and nested.is_dir():
        return nested
    return root


# (image, question, answer, where) as read from the files of one subtask.
_MMEQuestion = tuple[Path, str, str, str]


def _read_mme_release_subtask(folder: Path) -> Iterator[_MMEQuestion]:
    qa_dir = folder / 'questions_answers_YN'
    image_dir = folder / 'images' if qa_dir.is_dir() else folder
    qa_dir = qa_dir if qa_dir.is_dir() else folder
    question_files = sorted(qa_dir.glob('*.txt'))
    if not question_files:
        raise DatasetError(f'MME subtask folder {folder} has no question files (*.txt)')
    for qa_file in question_files:
        image = _find_image(image_dir, qa_file.stem)
        for line_no, fields in _tsv_lines(qa_file):
            if len(fields) != 2:
                raise DatasetError(f'{qa_file}:{line_no}: expected "question<TAB>answer", got {len(fields)} fields')
            yield image, fields[0], fields[1], f'{qa_file}:{line_no}'


def _read_mme_listing(listing: Path, folder: Path) -> Iterator[_MMEQuestion]:
    image_dirs = (folder / 'images', folder)
    for line_no, fields in _tsv_lines(listing):
        if len(fields) < 3:
            raise DatasetError(f'{listing}:{line_no}: expected "image<TAB>question<TAB>answer"')
        name, question, answer = fields[:3]
        image = next((d / name for d in image_dirs if (d / name).is_file()), None)
        if image is None:
            raise DatasetError(f'{listing}:{line_no}: image {name} not found in {folder} or {folder / "images"}')
        yield image, question, answer, f'{listing}:{line_no}'


def _mme_items(subtask: str, questions: Iterable[_MMEQuestion]) -> Iterator[EvalItem]:
    per_image: dict[str, int] = {}
    for image, question, answer, where in questions:
        answer = answer.strip().lower()
        if answer not in ('yes', 'no'):
            raise DatasetError(f'{where}: MME answers must be Yes or No, got {answer!r}')
        group = f'{subtask}/{image.name}'
        position = per_image.get(group, 0)
        per_image[group] = position + 1
        yield EvalItem(id=f'{group}#{position}', question=question, answers=(answer,), category=subtask,
                       group=group, image_path=image, metadata={'image_name': image.name})


def _tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    # utf-8-sig: a byte-order mark must not become part of the first question.
    for line_no, line in enumerate(path.read_text(encoding='utf-8-sig').splitlines(), start=1):
        if line.strip():
            yield line_no, [f.strip() for f in line.split('\t')]


def _find_image(folder: Path, stem: str) -> Path:
    for suffix in _IMAGE_SUFFIXES:
        candidate = folder / f'{stem}{suffix}'
        if candidate.is_file():
            return candidate
    raise DatasetError(f'no image named {stem}.jpg/.png in {folder}')


# --------------------------------------------------------------------------------------------------- TextVQA


def load_textvqa(json_path: str | Path, *, image_dir: str | Path | None = None,
                 ocr_json: str | Path | None = None) -> list[EvalItem]:
    """Load the official TextVQA JSON; `ocr_json` (TextVQA Rosetta OCR file) adds `metadata['ocr_tokens']`."""
    json_path = Path(json_path)
    entries = _read_json(json_path).get('data')
    if not isinstance(entries, list):
        raise DatasetError(f'{json_path}: expected a top-level "data" list (official TextVQA JSON)')
    if image_dir is None:
        default = json_path.parent / 'train_images'
        image_dir = default if default.is_dir() else json_path.parent
    image_dir = Path(image_dir)
    ocr = _load_ocr_tokens(Path(ocr_json)) if ocr_json is not None else {}
    items = []
    for position, entry in enumerate(entries):
        where = f'{json_path}: data[{position}]'
        missing = [k for k in ('question', 'image_id', 'answers') if k not in entry]
        if missing:
            raise DatasetError(f'{where} lacks {", ".join(missing)} (the test split has no answers to score)')
        answers = tuple(str(a) for a in entry['answers'])
        if not answers:
            raise DatasetError(f'{where} has no answers')
        if len(answers) != 10:
            logger.warning('%s has %d answers; VQA accuracy is defined for 10', where, len(answers))
        image_id = str(entry['image_id'])
        metadata: dict[str, Any] = {'image_id': image_id}
        if image_id in ocr:
            metadata['ocr_tokens'] = ocr[image_id]
        items.append(EvalItem(id=str(entry.get('question_id', position)), question=str(entry['question']),
                              answers=answers, image_path=_find_image(image_dir, image_id), metadata=metadata))
    _check_unique_ids(items, json_path)
    return items


def _load_ocr_tokens(path: Path) -> dict[str, list[str]]:
    entries = _read_json(path).get('data', [])
    return {str(e['image_id']): list(e.get('ocr_tokens', [])) for e in entries if 'image_id' in e}


# --------------------------------------------------------------------------------------------------- MMBench


def load_mmbench_tsv(tsv_path: str | Path) -> list[EvalItem]:
    """Load an MMBench TSV (base64 images; rows with index >= 1e6 become circular rotations of index % 1e6)."""
    tsv_path = Path(tsv_path)
    # Base64 images exceed csv's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with tsv_path.open(encoding='utf-8', newline='') as handle:
        rows = list(csv.DictReader(handle, delimiter='\t'))
    if not rows:
        raise DatasetError(f'{tsv_path} has no rows')
    missing = [c for c in ('index', 'question', 'answer') if c not in rows[0]]
    if missing:
        raise DatasetError(f'{tsv_path} lacks column(s) {", ".join(missing)} (the test split has no answers)')
    images = {row['index']: row.get('image') or '' for row in rows}
    decoded: dict[str, bytes] = {}
    items = []
    for line_no, row in enumerate(rows, start=2):
        where = f'{tsv_path}:{line_no}'
        try:
            index = int(row['index'])
        except ValueError:
            raise DatasetError(f'{where}: index must be an integer, got {row["index"]!r}') from None
        options = {c: row[c] for c in _MMBENCH_OPTION_COLUMNS if _present(row.get(c))}
        hint = row.get('hint')
        items.append(_mc_item(
            id=row['index'], question=row['question'], options=options, answer=row['answer'].strip(),
            category=row.get('category') or '', hint=hint if _present(hint) else None,
            group=str(index % MMBENCH_CIRCULAR_OFFSET), rotation=index // MMBENCH_CIRCULAR_OFFSET,
            image_bytes=_mmbench_image(row, images, decoded, where), image_path=_relative_image(row, tsv_path),
            metadata={'l2-category': row['l2-category']} if _present(row.get('l2-category')) else {}, where=where))
    _check_unique_ids(items, tsv_path)
    return items


def _mmbench_image(row: Mapping[str, str], images: Mapping[str, str], decoded: dict[str, bytes],
                   where: str) -> bytes | None:
    """The row's decoded image, decoded once per source row and shared (circular copies reuse one image)."""
    source = row['index']
    reference = row.get('image') or ''
    # VLMEvalKit stores a repeated image once; other rows hold the index of the row that has it.
    if reference.isdigit() and len(reference) <= 64:
        if reference not in images:
            raise DatasetError(f'{where}: image refers to missing row {reference}')
        source = reference
    if not images[source]:
        return None
    if source not in decoded:
        try:
            decoded[source] = base64.b64decode(images[source], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DatasetError(f'{where}: image is not valid base64 ({exc})') from None
    return decoded[source]


def _relative_image(row: Mapping[str, str], tsv_path: Path) -> Path | None:
    # Some TSV variants reference image files instead of embedding them.
    value = row.get('image_path')
    if value is None or not _present(value) or _present(row.get('image')):
        return None
    return tsv_path.parent / value


def _present(value: str | None) -> bool:
    return value is not None and value.strip() != ''


# --------------------------------------------------------------------------------------------------- JSONL


def load_jsonl(path: str | Path) -> list[EvalItem]:
    """Load one question per JSON line (layout of shared/data/vqa/questions.jsonl); image paths are relative."""
    path = Path(path)
    items = []
    for line_no, line in enumerate(path.read_text(encoding='utf-8').splitlines(), start=1):
        if not line.strip():
            continue
        where = f'{path}:{line_no}'
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f'{where}: not valid JSON ({exc.msg})') from None
        items.append(_jsonl_item(record, path.parent, str(record.get('id', record.get('index', line_no))), where))
    if not items:
        raise DatasetError(f'{path} has no questions')
    _check_unique_ids(items, path)
    return items


def _jsonl_item(record: Mapping[str, Any], base: Path, item_id: str, where: str) -> EvalItem:
    if 'question' not in record:
        raise DatasetError(f'{where}: missing "question"')
    answers = record.get('answers', [record['answer']] if 'answer' in record else [])
    if isinstance(answers, str) or not answers:
        raise DatasetError(f'{where}: "answers" must be a non-empty list')
    image = record.get('image')
    image_path = (base / image) if image else None
    if image_path is not None and not image_path.is_file():
        raise DatasetError(f'{where}: image not found: {image_path}')
    options = {str(k): str(v) for k, v in (record.get('options') or {}).items()}
    common: dict[str, Any] = {
        'id': item_id, 'question': str(record['question']), 'category': str(record.get('category', '')),
        'group': str(record.get('group', '')), 'hint': record.get('hint') or None, 'image_path': image_path}
    if options:
        return _mc_item(options=options, answer=str(answers[0]), where=where, **common)
    return EvalItem(answers=tuple(str(a) for a in answers), **common)


# --------------------------------------------------------------------------------------------------- circular


def rotate_options(item: EvalItem, shift: int) -> EvalItem:
    """Circularly shift the options by `shift`: new option i is old option (i + shift) mod N; the answer follows.

    This is MMBench's CircularEval (ABCD -> BCDA -> CDAB -> DABC); rotation k of question `q` gets id `q@k`.
    """
    letters = list(item.options)
    texts = list(item.options.values())
    n = len(letters)
    if n < 2 or item.answers[0] not in item.options:
        raise DatasetError(f'item {item.id} cannot be rotated: needs >= 2 options and an option-letter answer')
    shift %= n
    answer = letters[(letters.index(item.answers[0]) - shift) % n]
    return replace(item, id=item.id if shift == 0 else f'{item.group}@{shift}', rotation=shift, answers=(answer,),
                   options={letters[i]: texts[(i + shift) % n] for i in range(n)})


def expand_circular(items: Iterable[EvalItem]) -> list[EvalItem]:
    """All N rotations of every N-option question, each group's rotations kept together."""
    return [rotate_options(item, k) for item in items for k in range(len(item.options))]


def _apply_circular_policy(items: list[EvalItem], circular: bool) -> list[EvalItem]:
    if not circular:
        return [item for item in items if item.rotation == 0]
    if not any(item.rotation for item in items):
        return expand_circular(items)
    # VLMEvalKit TSVs list all originals first, then the copies: bring each question's rotations together.
    order: dict[str, int] = {}
    for item in items:
        order.setdefault(item.group, len(order))
    return sorted(items, key=lambda item: (order[item.group], item.rotation))


# --------------------------------------------------------------------------------------------------- helpers


def _mc_item(*, options: Mapping[str, str], answer: str, where: str, **fields: Any) -> EvalItem:
    if len(options) < 2:
        raise DatasetError(f'{where}: a multiple-choice question needs at least 2 options, got {len(options)}')
    if answer not in options:
        raise DatasetError(f'{where}: answer {answer!r} is not one of the options {", ".join(options)}')
    return EvalItem(options=dict(options), answers=(answer,), **fields)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise DatasetError(f'file not found: {path}') from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f'{path}: not valid JSON ({exc.msg} at line {exc.lineno})') from None
    if not isinstance(data, dict):
        raise DatasetError(f'{path}: expected a JSON object at the top level')
    return data


def _check_unique_ids(items: Sequence[EvalItem], source: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise DatasetError(f'{source}: duplicate question id {item.id!r}')
        seen.add(item.id)

