"""An OpenAI-compatible HTTP server over one model: ``instructkit serve`` and :func:`create_app`."""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any):
    """See :func:`instructkit.serve.app.create_app` (imported on use: fastapi loads only to serve)."""
    from instructkit.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
