"""lidar_encoder: the ImageBind encoder node for the lidar only (see encoder_node.py)."""
from mm_llm_ros.ros.encoder_node import EncoderNode
from mm_llm_ros.ros.lifecycle import autostarted
from mm_llm_ros.ros.node_main import exit_now, run_node


def main(args=None) -> None:
    exit_now(run_node(autostarted(lambda: EncoderNode('lidar_encoder')), args))


if __name__ == '__main__':
    main()
