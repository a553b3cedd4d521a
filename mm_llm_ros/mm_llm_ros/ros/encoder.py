"""encoder: every enabled sensor (use_camera, use_audio, use_lidar) in one process with one shared ImageBind."""
from mm_llm_ros.ros.encoder_node import EncoderNode
from mm_llm_ros.ros.node_main import run_node


def main(args=None) -> None:
    raise SystemExit(run_node(lambda: EncoderNode('encoder'), args))


if __name__ == '__main__':
    main()
