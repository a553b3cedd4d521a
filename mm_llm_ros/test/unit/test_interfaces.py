"""The interface package exposes every field the issue lists (the `ros2 interface show` equivalent)."""
import pytest

Ask = pytest.importorskip('mm_llm_ros_interfaces.srv').Ask
msgs = pytest.importorskip('mm_llm_ros_interfaces.msg')
AskStream = pytest.importorskip('mm_llm_ros_interfaces.action').AskStream

ASK_GOAL = {'question': 'string', 'modalities': 'sequence<string>', 'max_age_s': 'float', 'max_new_tokens': 'uint32'}
ASK_RESULT = {'success': 'boolean', 'answer': 'string', 'error': 'string', 'modalities_used': 'sequence<string>',
              'source_stamps': 'sequence<builtin_interfaces/Time>', 'latency_s': 'float',
              'note': 'string', 'tokens_generated': 'uint32', 'tokens_per_s': 'float'}


def fields(cls):
    return cls.get_fields_and_field_types()


def test_ask_service_fields():
    assert fields(Ask.Request) == ASK_GOAL
    assert fields(Ask.Response) == ASK_RESULT


def test_ask_stream_action_matches_service():
    assert fields(AskStream.Goal) == ASK_GOAL
    assert fields(AskStream.Result) == ASK_RESULT
    assert fields(AskStream.Feedback)['partial_answer'] == 'string'


def test_embedding_message():
    assert fields(msgs.Embedding) == {'header': 'std_msgs/Header', 'modality': 'string', 'model': 'string',
                                      'source_topic': 'string', 'embedding': 'sequence<float>'}


def test_scene_description_message():
    assert fields(msgs.SceneDescription) == {'header': 'std_msgs/Header', 'description': 'string',
                                             'modalities': 'sequence<string>',
                                             'source_stamps': 'sequence<builtin_interfaces/Time>',
                                             'latency_s': 'float',
                                             'objects': 'sequence<mm_llm_ros_interfaces/SceneObject>',
                                             'texts': 'sequence<mm_llm_ros_interfaces/SceneText>',
                                             'sounds': 'sequence<mm_llm_ros_interfaces/SceneSound>'}


def test_scene_entity_messages_carry_source_frame_stamp_and_placement():
    source = {'header': 'std_msgs/Header', 'source_topic': 'string'}
    assert fields(msgs.SceneObject) == {**source, 'position': 'geometry_msgs/Point',
                                        'box_center': 'geometry_msgs/Point', 'size': 'geometry_msgs/Vector3',
                                        'distance_m': 'float', 'bearing_deg': 'float', 'num_points': 'uint32'}
    assert fields(msgs.SceneText) == {**source, 'text': 'string', 'confidence': 'float', 'box': 'float[8]',
                                      'image_width': 'uint32', 'image_height': 'uint32', 'position': 'string'}
    assert fields(msgs.SceneSound) == {**source, 'label': 'string', 'score': 'float', 'speech': 'uint8'}
    assert (msgs.SceneSound.SPEECH_UNKNOWN, msgs.SceneSound.SPEECH_NO, msgs.SceneSound.SPEECH_YES) == (0, 1, 2)


def test_audio_chunk_message():
    assert fields(msgs.AudioChunk) == {'header': 'std_msgs/Header', 'sample_rate': 'uint32', 'channels': 'uint8',
                                       'encoding': 'string', 'data': 'sequence<uint8>'}
    assert {msgs.AudioChunk.ENCODING_S16LE, msgs.AudioChunk.ENCODING_F32LE} == {'S16LE', 'F32LE'}


def test_perception_context_message():
    assert fields(msgs.PerceptionContext) == {'header': 'std_msgs/Header', 'kind': 'string', 'text': 'string',
                                              'json': 'string', 'source_topic': 'string', 'latency_s': 'float'}
    assert (msgs.PerceptionContext.KIND_OCR, msgs.PerceptionContext.KIND_AUDIO_EVENTS,
            msgs.PerceptionContext.KIND_GEOMETRY) == ('ocr', 'audio_events', 'geometry')
