"""Static checks of a project's app.py, before any build: it exists, parses and binds a global ``app``.

Nothing here imports user code; the image imports it again at build time and catches the rest.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AppValidationError
from .links import link_problem

APP_FILE = "app.py"
APP_HINT = (
    "app.py must assign a WSGI application to a module-level global named app, e.g.\n\n"
    "    from flask import Flask\n    app = Flask(__name__)\n\n"
    "`mlserve init` writes a working one."
)
# Dotted names a call or decorator resolves to -> (what to call the app, whether it is ASGI).
FRAMEWORKS: dict[str, tuple[str, bool]] = {
    "flask.Flask": ("flask.Flask", False),
    "flask.app.Flask": ("flask.Flask", False),
    "bottle.Bottle": ("bottle.Bottle", False),
    "bottle.default_app": ("bottle.Bottle", False),
    "falcon.App": ("falcon.App", False),
    "falcon.API": ("falcon.App", False),
    "django.core.wsgi.get_wsgi_application": ("django", False),
    "a2wsgi.ASGIMiddleware": ("a2wsgi.ASGIMiddleware", False),
    "fastapi.FastAPI": ("fastapi.FastAPI", True),
    "fastapi.applications.FastAPI": ("fastapi.FastAPI", True),
    "starlette.applications.Starlette": ("starlette.Starlette", True),
    "quart.Quart": ("quart.Quart", True),
    "litestar.Litestar": ("litestar.Litestar", True),
    "sanic.Sanic": ("sanic.Sanic", True),
    "falcon.asgi.App": ("falcon.asgi.App", True),
    "django.core.asgi.get_asgi_application": ("django", True),
}
# Names people give their application object when they do not call it `app`.
USUAL_NAMES = ("application", "wsgi_app", "api", "asgi_app", "server", "flask_app", "webapp", "web_app")
_LITERALS = (ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.JoinedStr,
             ast.ListComp, ast.DictComp, ast.SetComp, ast.GeneratorExp)


@dataclass(frozen=True)
class AppReport:
    """What ``app`` is, as far as reading app.py tells."""

    path: Path  # the app.py checked
    kind: str | None  # e.g. "flask.Flask", "werkzeug", "fastapi.FastAPI (ASGI)", "WSGI function"; None if unknown
    asgi: bool  # statically recognised as ASGI: served through the a2wsgi adapter

    def summary(self) -> str:
        """``ok (global flask.Flask app)``, as the CLI prints it."""
        if self.kind is None:
            return "ok"
        if self.asgi:
            return f"ok (global {self.kind} app, served through the ASGI adapter a2wsgi)"
        return f"ok (global {self.kind} app)"


@dataclass(frozen=True)
class _Binding:
    """One module-level statement that binds a name."""

    node: ast.AST | None  # the value assigned, or the def/class; None when unknown (tuple unpacking...)
    line: int
    conditional: bool = False  # inside if/try/for...: may not run
    main_only: bool = False  # inside `if __name__ == "__main__":`, which never runs under uWSGI
    origin: str | None = None  # for imports: the dotted name imported


@dataclass
class _Module:
    """The module-level bindings of app.py, by name."""

    bindings: dict[str, list[_Binding]] = field(default_factory=dict)
    star_import: bool = False

    def add(self, name: str, binding: _Binding) -> None:
        self.bindings.setdefault(name, []).append(binding)

    def scan(self, body: list[ast.stmt], conditional: bool = False, main_only: bool = False) -> None:
        for stmt in body:
            flags: dict[str, Any] = {"line": stmt.lineno, "conditional": conditional, "main_only": main_only}
            if isinstance(stmt, ast.If):
                self.scan(stmt.body, True, main_only or _is_main_guard(stmt.test))
                self.scan(stmt.orelse, True, main_only)
            elif isinstance(stmt, (ast.Try, ast.TryStar)):
                for block in (stmt.body, *(h.body for h in stmt.handlers), stmt.orelse, stmt.finalbody):
                    self.scan(block, True, main_only)
            elif isinstance(stmt, (ast.For, ast.AsyncFor, ast.While)):
                self.scan(stmt.body + stmt.orelse, True, main_only)
            elif isinstance(stmt, (ast.With, ast.AsyncWith)):
                self.scan(stmt.body, conditional, main_only)
            elif isinstance(stmt, ast.Match):
                for case in stmt.cases:
                    self.scan(case.body, True, main_only)
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    self._bind_target(target, stmt.value, flags)
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                self._bind_target(stmt.target, stmt.value, flags)
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.add(stmt.name, _Binding(stmt, **flags))
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    top = alias.name.split(".")[0]
                    self.add(alias.asname or top, _Binding(None, origin=alias.name if alias.asname else top, **flags))
            elif isinstance(stmt, ast.ImportFrom):
                module = "." * stmt.level + (stmt.module or "")
                for alias in stmt.names:
                    if alias.name == "*":
                        self.star_import = True
                    else:
                        self.add(alias.asname or alias.name, _Binding(None, origin=f"{module}.{alias.name}", **flags))

    def _bind_target(self, target: ast.expr, value: ast.expr | None, flags: dict[str, Any]) -> None:
        if isinstance(target, ast.Name):
            self.add(target.id, _Binding(value, **flags))
        elif isinstance(target, (ast.Tuple, ast.List)):
            same_shape = isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts)
            for i, element in enumerate(target.elts):
                element = element.value if isinstance(element, ast.Starred) else element
                self._bind_target(element, value.elts[i] if same_shape else None, flags)  # type: ignore[union-attr]

    # -- what a binding is -----------------------------------------------------------------

    def local(self, name: str) -> _Binding | None:
        """The last module-level binding of ``name`` that runs under uWSGI."""
        live = [b for b in self.bindings.get(name, []) if not b.main_only]
        return live[-1] if live else None

    def dotted(self, expr: ast.expr) -> str | None:
        """``flask.Flask`` for ``Flask`` after ``from flask import Flask``, or ``fl.Flask`` after ``import flask as fl``."""
        if isinstance(expr, ast.Attribute):
            base = self.dotted(expr.value)
            return f"{base}.{expr.attr}" if base else None
        if isinstance(expr, ast.Name):
            binding = self.local(expr.id)
            return binding.origin if binding else None
        return None

    def kind(self, binding: _Binding, depth: int = 0) -> tuple[str | None, bool]:
        """(kind, asgi) of what ``binding`` binds, or (None, False) when reading cannot tell."""
        node = binding.node
        if binding.origin:
            return _framework(binding.origin)
        if isinstance(node, ast.AsyncFunctionDef):
            return "ASGI function", True
        if isinstance(node, ast.FunctionDef):
            if node.decorator_list:  # @Request.application def app(request): ... is werkzeug's
                targets = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
                return next((k for k in (_framework(self.dotted(t) or "") for t in targets) if k[0]), (None, False))
            return ("WSGI function", False) if _takes_two(node.args) else (None, False)
        if isinstance(node, ast.Lambda):
            return ("WSGI function", False) if _takes_two(node.args) else (None, False)
        if isinstance(node, ast.Name) and depth < 8:  # app = application
            alias = self.local(node.id)
            return self.kind(alias, depth + 1) if alias and alias is not binding else (None, False)
        if isinstance(node, ast.Call):
            func = node.func
            local = self.local(func.id) if isinstance(func, ast.Name) else None
            if local and isinstance(local.node, ast.ClassDef):
                return self._instance_kind(local.node)
            if local and isinstance(local.node, ast.FunctionDef):  # app = create_app()
                return self._factory_kind(local.node)
            name = self.dotted(func)
            if name:
                kind, asgi = _framework(name)
                return (kind or name.lstrip("."), asgi)
        if isinstance(node, ast.Attribute):
            return _framework(self.dotted(node) or "")
        return None, False

    def _instance_kind(self, cls: ast.ClassDef) -> tuple[str | None, bool]:
        for base in cls.bases:  # class MyApp(Flask): ...
            kind, asgi = _framework(self.dotted(base) or "")
            if kind:
                return kind, asgi
        asgi = isinstance(_method(cls, "__call__"), ast.AsyncFunctionDef)
        return f"{cls.name} instance" + (" (ASGI)" if asgi else ""), asgi

    def _factory_kind(self, factory: ast.FunctionDef) -> tuple[str | None, bool]:
        for node in ast.walk(factory):
            if isinstance(node, ast.Call):
                kind, asgi = _framework(self.dotted(node.func) or "")
                if kind:
                    return kind, asgi
        return None, False

    def not_callable(self, binding: _Binding) -> str | None:
        """Why ``binding`` is certainly not callable, or None."""
        node = binding.node
        if isinstance(node, _LITERALS):
            what = "None" if isinstance(node, ast.Constant) and node.value is None else _literal_name(node)
            return f"is assigned {what} on line {binding.line}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            local = self.local(node.func.id)
            if local and isinstance(local.node, ast.ClassDef) and not _method(local.node, "__call__") \
                    and all(isinstance(b, ast.Name) and b.id == "object" for b in local.node.bases):
                return f"is an instance of class {local.node.name}, which defines no __call__ (line {binding.line})"
        return None


def _framework(dotted: str) -> tuple[str | None, bool]:
    if dotted in FRAMEWORKS:
        kind, asgi = FRAMEWORKS[dotted]
        return (f"{kind} (ASGI)" if asgi else kind), asgi
    if dotted.startswith("werkzeug."):
        return "werkzeug", False
    return None, False


def _is_main_guard(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
        isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
    )


def _takes_two(args: ast.arguments) -> bool:
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    return required <= 2 and (positional >= 2 or args.vararg is not None)


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    return next((n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)


def _literal_name(node: ast.AST) -> str:
    if isinstance(node, ast.Constant):
        return f"a {type(node.value).__name__} literal ({ast.unparse(node)[:40]})"
    if isinstance(node, ast.JoinedStr):
        return "a string (f-string)"
    return f"a {type(node).__name__.lower().replace('comp', ' comprehension').replace('generatorexp', 'generator')}"


def _parse(path: Path) -> ast.Module:
    source = path.read_bytes()
    try:
        return ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        line = exc.lineno or 0
        text = exc.text
        if text is None and line:
            lines = source.decode("utf-8", "replace").splitlines()
            text = lines[line - 1] if line <= len(lines) else ""
        hint = None
        if text:
            stripped = text.rstrip("\n").expandtabs()
            indent = len(stripped) - len(stripped.lstrip())
            start = max((exc.offset or 1) - 1, indent)
            end = (exc.end_offset or 0) - 1 if exc.end_lineno == line else 0  # end_offset is 1-based, exclusive
            end = max(end, start + 1)
            hint = f"    {stripped}\n    {' ' * start}{'^' * (end - start)}"
        raise AppValidationError(f"{path}:{line}: {exc.msg}", hint) from None
    except ValueError as exc:  # null bytes in older Pythons
        raise AppValidationError(f"{path} cannot be parsed: {exc}") from None


def validate_app(project_dir: Path) -> AppReport:
    """Check statically that ``project_dir/app.py`` exists, parses and binds a module-level callable ``app``.

    Returns an AppReport saying what ``app`` is when the code tells (``kind`` None otherwise).
    Raises AppValidationError when app.py is missing, is a symbolic link that leaves the project
    folder (it is not read then), has a syntax error, defines no global ``app``, assigns it something
    that is not callable, or assigns it only under ``if __name__ == "__main__":``.
    """
    path = project_dir / APP_FILE
    problem = link_problem(path, project_dir)
    if problem:
        raise AppValidationError(
            f"{path} {problem}; it was not read",
            "mlserve reads and ships only files inside the project folder (a link is followed when it stays inside): "
            "copy the app into app.py here.",
        )
    if not path.is_file():
        raise AppValidationError(f"there is no app.py in {project_dir.resolve()}", APP_HINT)
    tree = _parse(path)
    module = _Module()
    module.scan(tree.body)
    bindings = module.bindings.get("app", [])
    live = [b for b in bindings if not b.main_only]
    if not live:
        if bindings:
            raise AppValidationError(
                f'{path} assigns app only under `if __name__ == "__main__":` (line {bindings[0].line}); '
                "uWSGI imports app.py as a module, so that block never runs and there is no app to serve",
                "Move the assignment to module level and keep only the local `app.run(...)` under the guard.",
            )
        # `from somewhere import *`, or `global app` in a function, may bind it; the build's import will tell.
        if module.star_import or any(isinstance(n, ast.Global) and "app" in n.names for n in ast.walk(tree)):
            return AppReport(path, None, False)
        raise AppValidationError(f"{path} defines no global named app", _missing_app_hint(module))
    for binding in reversed(live):
        reason = module.not_callable(binding)
        if reason is None:
            kind, asgi = module.kind(binding)
            return AppReport(path, kind, asgi)
        if not binding.conditional:
            break
    raise AppValidationError(
        f"{path}: app {reason}, which is not callable",
        "uWSGI calls app(environ, start_response) for every request: assign it a WSGI application, e.g. Flask(__name__).",
    )


def _missing_app_hint(module: _Module) -> str:
    """Suggest ``app = <name>`` when app.py builds its application under another name."""
    calls = {name: b[-1].node for name, b in module.bindings.items() if isinstance(b[-1].node, ast.Call)}
    built = [name for name, call in calls.items() if _framework(module.dotted(call.func) or "")[0]]
    usual = [name for name in USUAL_NAMES if module.local(name)]
    for name in built + usual:
        return f"uWSGI serves the global named app: add `app = {name}` after {name} is defined."
    return APP_HINT
