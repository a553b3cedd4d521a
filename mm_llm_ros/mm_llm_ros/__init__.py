"""mm_llm_ros: multimodal language understanding for robots (ImageBind + ImageBind-LLM on ROS 2)."""
