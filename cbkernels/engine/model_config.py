"""The one place the engine reads a model's text configuration (multimodal models nest it)."""
from __future__ import annotations

# Context bound when the model config names none.
DEFAULT_MAX_CONTEXT = 8192


def text_config(model_or_config):
    """The decoder's config of a model or config (``get_text_config()`` where it exists)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_context(model_or_config) -> int:
    """Longest sequence the model takes: ``max_position_embeddings``, else DEFAULT_MAX_CONTEXT."""
    return getattr(text_config(model_or_config), "max_position_embeddings", None) or DEFAULT_MAX_CONTEXT
