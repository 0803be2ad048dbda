"""Static checks of app.py: each error the user can make, and each shape of a valid `app`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from mlserve.errors import AppValidationError
from mlserve.validate import AppReport, validate_app


def check(folder: Path, source: str) -> AppReport:
    (folder / "app.py").write_text(textwrap.dedent(source))
    return validate_app(folder)


def fails(folder: Path, source: str) -> AppValidationError:
    with pytest.raises(AppValidationError) as info:
        check(folder, source)
    return info.value


# -- errors ---------------------------------------------------------------------------------


def test_missing_app_py(tmp_path):
    with pytest.raises(AppValidationError) as info:
        validate_app(tmp_path)
    assert "no app.py" in info.value.message
    assert str(tmp_path) in info.value.message
    assert "global named app" in info.value.hint and "Flask(__name__)" in info.value.hint


def test_app_py_that_is_a_folder_is_missing(tmp_path):
    (tmp_path / "app.py").mkdir()
    with pytest.raises(AppValidationError, match="no app.py"):
        validate_app(tmp_path)


def test_syntax_error_names_the_line_and_shows_a_caret(tmp_path):
    error = fails(tmp_path, "import os\nx = = 1\napp = None\n")
    assert "app.py:2: invalid syntax" in error.message
    code, caret = error.hint.splitlines()
    assert code.strip() == "x = = 1"
    assert caret.strip() == "^"
    assert code[caret.index("^")] == "="  # the caret points into the line, under the second '='
    assert caret.index("^") == code.index("= 1")


def test_unclosed_bracket_reports_where_it_opened(tmp_path):
    error = fails(tmp_path, "from flask import Flask\napp = Flask(\n")
    assert "app.py:2:" in error.message and "never closed" in error.message
    assert "app = Flask(" in error.hint


def test_syntax_error_with_indentation(tmp_path):
    error = fails(tmp_path, "def f():\nreturn 1\n")
    assert "app.py:2:" in error.message and "indented block" in error.message


def test_no_global_app(tmp_path):
    error = fails(tmp_path, "import os\n\ndef handler(environ, start_response):\n    pass\n")
    assert "defines no global named app" in error.message
    assert "Flask(__name__)" in error.hint


def test_no_global_app_suggests_aliasing_application(tmp_path):
    error = fails(tmp_path, "def application(environ, start_response):\n    return []\n")
    assert "global named app" in error.message
    assert "app = application" in error.hint


def test_no_global_app_suggests_the_name_of_a_framework_object(tmp_path):
    error = fails(tmp_path, "from flask import Flask\nmodel_server = Flask(__name__)\nthreshold = int('3')\n")
    assert "app = model_server" in error.hint


def test_app_only_inside_a_function_is_not_global(tmp_path):
    error = fails(tmp_path, "from flask import Flask\ndef make():\n    app = Flask(__name__)\n    return app\n")
    assert "global named app" in error.message


@pytest.mark.parametrize("value, what", [
    ("42", "int"), ("'hello'", "str"), ("None", "None"), ("[1, 2]", "list"), ("{'a': 1}", "dict"),
    ("(1, 2)", "tuple"), ("True", "bool"), ("f'{1}'", "f-string"), ("[x for x in range(3)]", "list comprehension"),
])
def test_literal_app_is_not_callable(tmp_path, value, what):
    error = fails(tmp_path, f"app = {value}\n")
    assert "not callable" in error.message
    assert what in error.message
    assert "line 1" in error.message


def test_literal_after_a_real_app_wins(tmp_path):
    error = fails(tmp_path, "from flask import Flask\napp = Flask(__name__)\napp = None\n")
    assert "not callable" in error.message and "line 3" in error.message


def test_instance_of_a_class_without_call_is_not_callable(tmp_path):
    error = fails(tmp_path, "class Model:\n    def predict(self, x):\n        return x\n\napp = Model()\n")
    assert "not callable" in error.message and "Model" in error.message and "__call__" in error.message


def test_app_only_under_main_guard(tmp_path):
    error = fails(tmp_path, """\
        from flask import Flask

        if __name__ == "__main__":
            app = Flask(__name__)
            app.run()
        """)
    assert "__main__" in error.message
    assert "uWSGI imports app.py" in error.message and "never runs" in error.message
    assert "module level" in error.hint


def test_main_guard_written_the_other_way_round(tmp_path):
    error = fails(tmp_path, "if '__main__' == __name__:\n    from server import app\n")
    assert "__main__" in error.message


# -- shapes of a valid app ---------------------------------------------------------------------


def test_report_fields(tmp_path):
    report = check(tmp_path, "from flask import Flask\napp = Flask(__name__)\n")
    assert report == AppReport(tmp_path / "app.py", "flask.Flask", False)
    assert report.summary() == "ok (global flask.Flask app)"


@pytest.mark.parametrize("source, kind", [
    ("from flask import Flask\napp = Flask(__name__)\n", "flask.Flask"),
    ("import flask\napp = flask.Flask(__name__)\n", "flask.Flask"),
    ("import flask as fl\napp = fl.Flask(__name__)\n", "flask.Flask"),
    ("from flask import Flask as F\napp = F(__name__)\n", "flask.Flask"),
    ("from flask.app import Flask\napp = Flask(__name__)\n", "flask.Flask"),
    ("import bottle\napp = bottle.default_app()\n", "bottle.Bottle"),
    ("import falcon\napp = falcon.App()\n", "falcon.App"),
    ("from django.core.wsgi import get_wsgi_application\napp = get_wsgi_application()\n", "django"),
    ("from werkzeug.middleware.dispatcher import DispatcherMiddleware\napp = DispatcherMiddleware(None, {})\n",
     "werkzeug"),
    (("from werkzeug.wrappers import Request, Response\n\n@Request.application\ndef app(request):\n"
      "    return Response('hi')\n"), "werkzeug"),
    ("import werkzeug.wrappers\napp = werkzeug.wrappers.Response('static answer')\n", "werkzeug"),
    (("from flask import Flask\nfrom werkzeug.middleware.proxy_fix import ProxyFix\n"
      "app = Flask(__name__)\napp = ProxyFix(app)\n"), "werkzeug"),
    ("from a2wsgi import ASGIMiddleware\nfrom fastapi import FastAPI\napp = ASGIMiddleware(FastAPI())\n",
     "a2wsgi.ASGIMiddleware"),
    ("def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'hi']\n", "WSGI function"),
    ("app = lambda environ, start_response: []\n", "WSGI function"),
    ("from mylib.server import ModelServer\napp = ModelServer('weights.pt')\n", "mylib.server.ModelServer"),
])
def test_wsgi_kinds(tmp_path, source, kind):
    report = check(tmp_path, source)
    assert (report.kind, report.asgi) == (kind, False)


@pytest.mark.parametrize("source, kind", [
    ("from fastapi import FastAPI\napp = FastAPI()\n", "fastapi.FastAPI (ASGI)"),
    ("import fastapi\napp = fastapi.FastAPI(title='x')\n", "fastapi.FastAPI (ASGI)"),
    ("from starlette.applications import Starlette\napp = Starlette()\n", "starlette.Starlette (ASGI)"),
    ("from quart import Quart\napp = Quart(__name__)\n", "quart.Quart (ASGI)"),
    ("from litestar import Litestar\napp = Litestar([])\n", "litestar.Litestar (ASGI)"),
    ("import falcon.asgi\napp = falcon.asgi.App()\n", "falcon.asgi.App (ASGI)"),
    ("async def app(scope, receive, send):\n    pass\n", "ASGI function"),
])
def test_asgi_kinds(tmp_path, source, kind):
    report = check(tmp_path, source)
    assert (report.kind, report.asgi) == (kind, True)
    assert "served through the ASGI adapter" in report.summary()


def test_annotated_assignment(tmp_path):
    assert check(tmp_path, "from flask import Flask\napp: Flask = Flask(__name__)\n").kind == "flask.Flask"


def test_bare_annotation_is_not_an_assignment(tmp_path):
    assert "global named app" in fails(tmp_path, "from flask import Flask\napp: Flask\n").message


def test_tuple_unpacking(tmp_path):
    assert check(tmp_path, "from flask import Flask\napp, port = Flask(__name__), 5000\n").kind == "flask.Flask"
    assert check(tmp_path, "from factory import build\napp, model = build()\n").kind is None


def test_chained_assignment_and_alias(tmp_path):
    report = check(tmp_path, "from flask import Flask\napplication = app = Flask(__name__)\n")
    assert report.kind == "flask.Flask"
    report = check(tmp_path, "from fastapi import FastAPI\napi = FastAPI()\napp = api\n")
    assert (report.kind, report.asgi) == ("fastapi.FastAPI (ASGI)", True)


def test_imported_app(tmp_path):
    assert check(tmp_path, "from server import app\n") == AppReport(tmp_path / "app.py", None, False)
    assert check(tmp_path, "from .server import application as app\n").kind is None
    assert check(tmp_path, "import server as app\n").kind is None


def test_star_import_or_global_statement_may_bring_app(tmp_path):
    assert check(tmp_path, "from server import *\n").kind is None
    assert check(tmp_path, "def setup():\n    global app\n    app = make()\nsetup()\n").kind is None


def test_factory_function(tmp_path):
    report = check(tmp_path, """\
        from flask import Flask

        def create_app():
            application = Flask(__name__)
            return application

        app = create_app()
        """)
    assert report.kind == "flask.Flask"
    assert check(tmp_path, "def create_app():\n    return object()\napp = create_app()\n").kind is None
    assert check(tmp_path, "from myproject import create_app\napp = create_app()\n").kind == "myproject.create_app"


def test_instance_of_a_local_class(tmp_path):
    report = check(tmp_path, """\
        class Model:
            def __call__(self, environ, start_response):
                start_response("200 OK", [])
                return [b"ok"]

        app = Model()
        """)
    assert (report.kind, report.asgi) == ("Model instance", False)
    report = check(tmp_path, "class Api:\n    async def __call__(self, scope, receive, send):\n        pass\napp = Api()\n")
    assert (report.kind, report.asgi) == ("Api instance (ASGI)", True)
    report = check(tmp_path, "from flask import Flask\nclass MyApp(Flask):\n    pass\napp = MyApp(__name__)\n")
    assert report.kind == "flask.Flask"


def test_assignment_inside_try_and_if(tmp_path):
    report = check(tmp_path, """\
        import os
        try:
            from fastapi import FastAPI
            app = FastAPI()
        except ImportError:
            app = None
        """)
    assert report.kind == "fastapi.FastAPI (ASGI)"  # the conditional None fallback does not hide it
    report = check(tmp_path, """\
        import os
        from flask import Flask
        if os.environ.get("DEBUG"):
            app = Flask("debug")
        else:
            app = Flask(__name__)
        """)
    assert report.kind == "flask.Flask"


def test_else_branch_of_the_main_guard_runs_under_uwsgi(tmp_path):
    report = check(tmp_path, """\
        from flask import Flask
        if __name__ == "__main__":
            print("run with mlserve")
        else:
            app = Flask(__name__)
        """)
    assert report.kind == "flask.Flask"


def test_main_guard_that_only_runs_the_app_is_fine(tmp_path):
    report = check(tmp_path, """\
        from flask import Flask

        app = Flask(__name__)

        if __name__ == "__main__":
            app.run(host="127.0.0.1", port=5000)
        """)
    assert report.kind == "flask.Flask"


def test_does_not_run_user_code(tmp_path):
    marker = tmp_path / "ran"
    report = check(tmp_path, f"open({str(marker)!r}, 'w').close()\nraise SystemExit(1)\ndef app(e, s):\n    return []\n")
    assert report.kind == "WSGI function"
    assert not marker.exists()


# -- symbolic links -----------------------------------------------------------------------------


WSGI = "def app(environ, start_response):\n    return []\n"


def test_app_py_linked_inside_the_project_is_followed(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "server.py").write_text(WSGI)
    (tmp_path / "app.py").symlink_to("src/server.py")
    assert validate_app(tmp_path).kind == "WSGI function"


def test_absolute_link_that_stays_inside_a_linked_project_is_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "server.py").write_text(WSGI)
    (tmp_path / "project").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "app.py").symlink_to(tmp_path / "project" / "server.py")
    assert validate_app(tmp_path / "project").kind == "WSGI function"


def test_app_py_linked_out_of_the_project_is_not_read(tmp_path, monkeypatch):
    outside = tmp_path / "secret.py"
    outside.write_text("x = = 'SECRET'\n")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "app.py").symlink_to(outside)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
    with pytest.raises(AppValidationError) as info:
        validate_app(tmp_path / "project")
    assert info.value.message == (f"{tmp_path}/project/app.py is a symbolic link to {outside}, "
                                  f"outside the project folder {tmp_path / 'project'}; it was not read")
    assert "SECRET" not in (info.value.hint or "") and "copy the app into app.py" in info.value.hint


def test_relative_link_up_and_out_is_refused(tmp_path):
    (tmp_path / "elsewhere.py").write_text(WSGI)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "app.py").symlink_to("../elsewhere.py")
    with pytest.raises(AppValidationError, match=r"is a symbolic link to \.\./elsewhere\.py, outside the project"):
        validate_app(tmp_path / "project")


def test_dangling_and_looping_app_py_links_say_so(tmp_path):
    (tmp_path / "app.py").symlink_to("gone.py")
    with pytest.raises(AppValidationError, match=r"app\.py is a symbolic link to gone\.py, which does not exist"):
        validate_app(tmp_path)
    (tmp_path / "app.py").unlink()
    (tmp_path / "a.py").symlink_to("app.py")
    (tmp_path / "app.py").symlink_to("a.py")
    with pytest.raises(AppValidationError, match=r"cannot be resolved"):
        validate_app(tmp_path)
