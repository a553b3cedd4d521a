"""Training pairs for the grounded adapter: generated scenes, questions and the answers their context gives.

The grounded benchmark (`grounded.py`) must stay a held-out test of what the tuned embedded default learned, so
training shares only the scene *structure* with it (the extractors' result types, rendered by the same fact-line
code llm_node uses) and nothing it is scored on:

* other sign texts (words and OCR-like codes) and other AudioSet sounds (`TRAINING_VOCABULARY`);
* other question wordings for every category, and other unanswerable questions;
* other seeds (`TRAINING_SEED`), and no real scenes at all (the benchmark's nuScenes, KITTI and sound files stay
  unseen).

Each answer is one short sentence built from the truth, as `grounded.scene_questions` derives it, worded so the
benchmark's scorer would accept it ("The nearest obstacle on the left is 4.2 m away.", "I cannot tell from my
sensors.").
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mm_llm_ros.core.answering import NOTHING_PERCEIVED, context_block
from mm_llm_ros.core.grounding.facts import prompt_text
from mm_llm_ros.core.grounding.geometry import SECTORS, side_of
from mm_llm_ros.core.llm.choice import CANNOT_TELL_ANSWER
from mm_llm_ros.core.llm.tuning import Example

from .grounded import Scene, Vocabulary, generated_scene

if TYPE_CHECKING:
    from mm_llm_ros.core.llm.pipeline import LLMConfig
    from mm_llm_ros.core.llm.prompt import PromptBuilder
    from mm_llm_ros.core.llm.tokenizer import TextTokenizer

TRAINING_SEED = 1000

_WORDS = ('EXIT B', 'CAUTION', 'STAFF ONLY', 'LIFT', 'RECEPTION', 'PLATFORM 2', 'NO ENTRY', 'KITCHEN', 'OFFICE 12',
          'YIELD', 'HOSPITAL', 'PARKING', 'DOCK 4', 'LEVEL 3', 'MEETING ROOM', 'STAIRS', 'AUTHORISED PERSONNEL',
          'HIGH VOLTAGE', 'SCHOOL', 'TAXI', 'HOTEL', 'BANK', 'POLICE', 'MUSEUM', 'LIBRARY', 'CHARGING', 'BAY 9',
          'AISLE 14', 'FORKLIFTS', 'HARD HAT AREA', 'SPEED LIMIT 20', 'PULL', 'CLOSED', 'MENU', 'TICKETS',
          'DELIVERIES', 'GARAGE', 'FIRST AID', 'SECURITY', 'WAREHOUSE', 'KEEP CLEAR', 'LANE 2', 'EAST WING',
          'Coffee', 'Bakery', 'Welcome', 'Station Rd', 'Gate B12', 'Zone A', 'Exit only', 'Lab 3b', 'Dock 7')
_CODES = ('A4', 'B7-2', 'KX 402', '1138', 'P2', 'ZONE 11', 'M25', 'R-17', 'TD', 'LOG1ST', 'HX7 9QP', 'N0RTH',
          '3F', 'AB-CD', 'Q9', 'BLK 5', 'E-12', 'STR 8', 'UNIT 4C', '42')
_SOUNDS = ('Bell', 'Church bell', 'Whistle', 'Thunder', 'Chainsaw', 'Helicopter', 'Motorcycle', 'Bicycle bell',
           'Crowd', 'Laughter', 'Cough', 'Clapping', 'Drum', 'Guitar', 'Piano', 'Truck', 'Bus',
           'Knock', 'Doorbell', 'Microwave oven', 'Blender', 'Printer', 'Air conditioning', 'Mechanical fan',
           'Ocean', 'Stream', 'Frog', 'Insect', 'Crow', 'Chicken, rooster', 'Horse', 'Sheep', 'Fireworks',
           'Explosion', 'Beep, bleep', 'Buzzer', 'Ringtone', 'Tick-tock', 'Whispering', 'Shout', 'Singing',
           'Crying, sobbing', 'Snoring', 'Boat, Water vehicle', 'Ambulance (siren)', 'Police car (siren)',
           'Jackhammer', 'Drill', 'Power tool', 'Air horn, truck horn', 'Car alarm', 'Smoke detector, smoke alarm',
           'Skateboard', 'Glass', 'Chewing, mastication', 'Keys jangling', 'Writing', 'Zipper (clothing)', 'Camera')
_PARENTS = {'Church bell': ('Bell',), 'Bicycle bell': ('Bell', 'Bicycle'),
            'Motorcycle': ('Vehicle', 'Motor vehicle (road)'), 'Truck': ('Vehicle', 'Motor vehicle (road)'),
            'Bus': ('Vehicle', 'Motor vehicle (road)'), 'Guitar': ('Music', 'Musical instrument'),
            'Piano': ('Music', 'Keyboard (musical)'), 'Drum': ('Music', 'Percussion'), 'Crow': ('Bird', 'Animal'),
            'Chicken, rooster': ('Fowl', 'Animal'), 'Horse': ('Animal', 'Livestock, farm animals, working animals'),
            'Sheep': ('Animal', 'Livestock, farm animals, working animals'), 'Frog': ('Animal', 'Wild animals'),
            'Ambulance (siren)': ('Siren', 'Emergency vehicle'), 'Police car (siren)': ('Siren', 'Emergency vehicle'),
            'Drill': ('Power tool', 'Tools'), 'Jackhammer': ('Power tool', 'Tools'), 'Thunder': ('Thunderstorm',),
            'Ocean': ('Waves, surf', 'Water'), 'Stream': ('Water',), 'Laughter': ('Human voice',),
            'Singing': ('Music', 'Human voice'), 'Air horn, truck horn': ('Vehicle horn, car horn, honking',)}
# Real lidar scans hold 20 to 40 clusters; an adapter trained on at most 12 copied only the first digit of such
# counts ("3" for 34). Training scenes draw 0-12 clusters or, one time in three (7 of 20 choices), 14-45.
_OBJECT_COUNTS = tuple(range(13)) + (14, 19, 23, 28, 32, 37, 45)
TRAINING_VOCABULARY = Vocabulary(_WORDS + _CODES, _SOUNDS, _PARENTS, _OBJECT_COUNTS)

_SECTOR_WORDS = {'front': ('in front', 'ahead of you', 'straight ahead', 'in front of you'),
                 'left': ('on your left', 'to the left', 'on the left side', 'left of the robot'),
                 'right': ('on your right', 'to the right', 'on the right side', 'right of the robot'),
                 'back': ('behind you', 'at the rear', 'behind', 'in the back')}
# How each sector reads in an answer ("The nearest obstacle on the left is ...").
_SECTOR_ANSWER = {'front': 'in front', 'left': 'on the left', 'right': 'on the right', 'back': 'behind'}
_DISTANCE_Q = ('How far away is the closest obstacle {where}?', 'What is the nearest obstacle distance {where}?',
               'How much room is there {where}?', 'Is anything close {where}? How far?',
               'How many metres to the nearest obstacle {where}?', 'What is the clearance {where}?',
               'Tell me the distance to the nearest obstacle {where}.')
_TEXT_Q = ('What is written in view?', 'Can you read any signs?', 'What words are visible?',
           'Tell me what the text says.', 'Is there a sign? What is on it?', 'What does the camera read?',
           'Any text around?', 'Read the sign for me.')
_SOUND_Q = ('What are you hearing?', 'What noise is that?', 'Which sound do you detect?',
            'What is the microphone picking up?', 'What sound is around the robot?', 'Do you hear anything? What?')
_SPEECH_Q = ('Is a person talking?', 'Does anyone speak nearby?', 'Is there a voice in the audio?',
             'Can you hear speech?', 'Is somebody saying something?')
_COUNT_Q = ('How many objects do you detect?', 'How many objects can the lidar see?',
            'What is the number of objects around you?', 'How many obstacles are nearby?')
_DIRECTION_Q = ('Where is the nearest object?', 'Which side is the closest object on?',
                'What direction is the nearest obstacle in?', 'Is the closest object left, right, ahead or behind?')
_UNANSWERABLE_Q = ('What colour is the sign?', 'How old is the person talking?', "What is the robot's battery "
                   'voltage?', 'What day is it?', 'How heavy is the closest object?', 'What is the humidity?',
                   'Who is in front of the robot?', 'What is the wifi signal strength?',
                   'What is the make of the nearest vehicle?', 'How many floors does the building have?',
                   'What is the GPS position of the robot?', 'What is the name of the person speaking?',
                   'What shape is the nearest object?', 'How bright is it?', 'What does the room smell like?',
                   'Is the door locked?', 'What year was this building built?', 'How far is the nearest city?')
# llm_node's scene-description instruction (description.prompt's default) and a few other wordings.
DESCRIBE_Q = ('Describe what the robot currently perceives in one or two sentences.', 'What do you perceive?',
              'Describe the scene around you.', 'Summarise what your sensors tell you.')
_MISSING_SENSOR_Q = {'ocr': _TEXT_Q, 'audio_events': _SOUND_Q + _SPEECH_Q,
                     'geometry': tuple(q.format(where='ahead of you') for q in _DISTANCE_Q[:4]) + _COUNT_Q}


@dataclass(frozen=True)
class TrainingPair:
    """One question about one scene and the answer its context gives."""

    scene: Scene
    category: str
    question: str
    answer: str


def training_pairs(scenes: int, seed: int = TRAINING_SEED) -> list[TrainingPair]:
    """Every question of `scenes` generated training scenes (about 8 per scene, one of them a scene
    description), in a seeded random order."""
    rng = random.Random(seed)
    pairs = []
    for index in range(scenes):
        scene = generated_scene(rng, f'train{seed}-{index:05d}', TRAINING_VOCABULARY)
        pairs.extend(TrainingPair(scene, category, question, answer)
                     for category, question, answer in scene_answers(scene, rng))
    rng.shuffle(pairs)
    return pairs


def scene_answers(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(category, question, answer) for a scene, with the truth `grounded.scene_questions` would take."""
    pairs = []
    ocr, audio, geometry = (scene.results.get(kind) for kind in ('ocr', 'audio_events', 'geometry'))
    if ocr is not None:
        pairs.append(('text', rng.choice(_TEXT_Q), f'I can read {_quoted(ocr.texts)}.' if ocr.texts else
                      'There is no text in view.'))
    if audio is not None:
        labels = _sound_labels(audio)
        if labels or not audio.events:
            pairs.append(('sound', rng.choice(_SOUND_Q), f'I hear {labels[0]}.' if labels else
                          'There is no clear sound.'))
        if audio.speech is not None:
            pairs.append(('speech', rng.choice(_SPEECH_Q), 'Yes, someone is speaking.' if audio.speech else
                          'No, nobody is speaking.'))
    if geometry is not None and not geometry.is_empty:
        for sector in rng.sample(SECTORS, 2):
            distance, where = geometry.nearest_m[sector], _SECTOR_ANSWER[sector]
            question = rng.choice(_DISTANCE_Q).format(where=rng.choice(_SECTOR_WORDS[sector]))
            pairs.append(('distance', question, f'There is no obstacle {where}.' if distance is None else
                          f'The nearest obstacle {where} is {distance:.1f} m away.'))
        pairs.append(('count', rng.choice(_COUNT_Q), _objects_around(geometry.num_clusters) + '.'))
        if geometry.clusters:
            pairs.append(('direction', rng.choice(_DIRECTION_Q),
                          f'The nearest object is {side_of(geometry.clusters[0].bearing_deg)}.'))
    pairs.append(('unanswerable', rng.choice(_UNANSWERABLE_Q), CANNOT_TELL_ANSWER))
    if scene.results:
        pairs.append(('describe', rng.choice(DESCRIBE_Q), describe(scene)))
    missing = [kind for kind in _MISSING_SENSOR_Q if kind not in scene.results]
    if missing:
        pairs.append(('unanswerable', rng.choice(_MISSING_SENSOR_Q[rng.choice(missing)]), CANNOT_TELL_ANSWER))
    return pairs


def scene_context(scene: Scene, config: LLMConfig) -> str:
    """The context block llm_node builds from this scene's messages: each kind it subscribes to, stored as its
    context callback stores it, in its `context.kinds` order, through the live formatter."""
    messages = {kind: (text, json_text) for kind, text, json_text in scene.messages()}
    block = context_block(config.context_template, (
        (kind, prompt_text(kind, *messages[kind], config.context_format, config.context_max_chars))
        for kind in config.context_kinds if kind in messages))
    return NOTHING_PERCEIVED if block is None else block


def training_examples(pairs: Sequence[TrainingPair], config: LLMConfig, tokenizer: TextTokenizer,
                      prompt: PromptBuilder) -> list[Example]:
    """Token ids of each pair: the prompt exactly as llm_node builds it for the question, the answer with EOS."""
    return [Example(prompt.encode(tokenizer, pair.question, scene_context(pair.scene, config)),
                    tokenizer.encode(pair.answer, bos=False, eos=True)) for pair in pairs]


def describe(scene: Scene) -> str:
    """A scene description that states what each sensor reported, and nothing else."""
    ocr, audio, geometry = (scene.results.get(kind) for kind in ('ocr', 'audio_events', 'geometry'))
    sentences = []
    if ocr is not None:
        sentences.append(f"The camera reads {_quoted(ocr.texts) if ocr.texts else 'no text'}.")
    if audio is not None and not audio.is_empty:
        labels = _sound_labels(audio)
        heard = f'I hear {labels[0]}' if labels else 'There is no clear sound'
        sentences.append(heard + (', and someone is speaking.' if audio.speech else '.'))
    if geometry is not None and not geometry.is_empty:
        objects = _objects_around(geometry.num_clusters)
        if geometry.clusters:
            nearest = geometry.clusters[0]
            objects += f', the nearest {nearest.distance_m:.1f} m away, {side_of(nearest.bearing_deg)}'
        sentences.append(objects + '.')
    return ' '.join(sentences) or CANNOT_TELL_ANSWER


def _quoted(texts: Sequence[str]) -> str:
    return ', '.join(f"'{text}'" for text in texts)


def _sound_labels(audio) -> list[str]:
    """The event labels other than speech, lower case, loudest first."""
    return [event.label.lower() for event in audio.events if event.label != 'Speech']


def _objects_around(count: int) -> str:
    return f"There {'is' if count == 1 else 'are'} {count} object{'' if count == 1 else 's'} around the robot"
