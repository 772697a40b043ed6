"""Ray Serve: live teacher-scoring endpoints over the branches' scorers."""

from copd_ray.serve.app import APP_NAME, ServeError, build_app, serve_running, start_serving, stop_serving

__all__ = ["APP_NAME", "ServeError", "build_app", "serve_running", "start_serving", "stop_serving"]
