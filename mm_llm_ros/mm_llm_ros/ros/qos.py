"""QoS profiles used across the package, defined once."""
from rclpy.qos import (DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy,
                       qos_profile_sensor_data)

# Sensor inputs: best effort, shallow (the ROS sensor-data profile). Only the freshest frame matters.
SENSOR_QOS = qos_profile_sensor_data

# Embeddings: reliable, shallow; consumers want the latest and a late subscriber needs no history.
EMBEDDING_QOS = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)

# Scene descriptions: latched, so a late-joining AR/VR bridge immediately gets the latest one.
LATCHED_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)

# /ask and /ask_stream: the default service depth (10) silently drops requests (and replies) when more callers
# arrive at once, leaving them hanging. Keep far more than max_queue so every caller gets an answer or "busy".
SERVICE_QOS = QoSProfile(depth=256, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)

# /ask_stream feedback: one message per token and goal. With several answers decoding together (continuous
# batching) tokens come faster than a client drains them, and the default depth (10) drops pieces of the stream
# (`new_text`); a deep reliable history keeps every piece. Clients that need every piece use it too.
FEEDBACK_QOS = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
