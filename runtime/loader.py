"""Import the user's app.py and make its global ``app`` a WSGI callable (ASGI apps get an adapter)."""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

APP_FILE = "app.py"
APP_NAME = "app"


class AppLoadError(Exception):
    """app.py is missing, fails to import, or its ``app`` is not a WSGI/ASGI callable."""


@dataclass(frozen=True)
class LoadedApp:
    wsgi: Callable[..., Any]
    kind: str  # e.g. "flask.Flask", "fastapi.FastAPI (ASGI)", "function"
    asgi: bool


def describe(obj: Any) -> str:
    if inspect.isfunction(obj):
        return "function"
    cls = type(obj)
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


def is_asgi(obj: Any) -> bool:
    """ASGI apps are coroutine functions, or objects whose ``__call__`` is one (FastAPI, Starlette)."""
    if inspect.iscoroutinefunction(obj):
        return True
    call = getattr(obj, "__call__", None)  # noqa: B004 - the method itself: is it a coroutine function?
    return call is not None and not inspect.isfunction(obj) and inspect.iscoroutinefunction(call)


def load(app_dir: str) -> LoadedApp:
    """Import ``app_dir/app.py`` as the module ``app`` and return its ``app``, as WSGI.

    Raises AppLoadError; exceptions raised by the user's module propagate with their traceback.
    """
    path = os.path.join(app_dir, APP_FILE)
    if not os.path.isfile(path):
        raise AppLoadError(f"no {APP_FILE} in {app_dir}")
    if app_dir not in sys.path:
        sys.path.insert(0, app_dir)
    spec = importlib.util.spec_from_file_location("app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["app"] = module
    spec.loader.exec_module(module)
    obj = getattr(module, APP_NAME, None)
    if obj is None:
        raise AppLoadError(f"{APP_FILE} defines no global named {APP_NAME}")
    if not callable(obj):
        raise AppLoadError(f"{APP_FILE}: {APP_NAME} is a {type(obj).__name__}, which is not callable")
    kind = describe(obj)
    if is_asgi(obj):
        from a2wsgi import ASGIMiddleware

        return LoadedApp(ASGIMiddleware(obj), f"{kind} (ASGI)", True)
    return LoadedApp(obj, kind, False)
