"""ROS-free core: preprocessing, models, fusion and generation. Nothing here imports rclpy."""
