"""Thin rclpy nodes around the core, one module per node."""
