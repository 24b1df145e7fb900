"""The OpenAI-compatible HTTP server (FastAPI + uvicorn). Imported only by ``1bit serve`` and tests."""

from __future__ import annotations

from .app import create_app
from .auth import load_api_keys
from .routes import ServerSettings

__all__ = ["create_app", "ServerSettings", "load_api_keys"]
