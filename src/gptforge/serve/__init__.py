"""OpenAI-compatible HTTP serving: `create_app`, the continuous-batching `Engine`, auth, limits, metrics, PII."""

from .app import ServerOptions, create_app, load_model_dir, run_server

__all__ = ["ServerOptions", "create_app", "load_model_dir", "run_server"]
