"""Thin DVC stage entry points: read params, call cdiff, write outputs, log to MLflow. Ray, MLflow and DVC live here."""
