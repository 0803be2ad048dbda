"""`mlserve init`'s scaffold: the files each template writes, overwrite rules, and the apps really running."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from werkzeug.test import Client

from mlserve.config import TOP_LEVEL, HealthPolicy, Limits, load_config
from mlserve.errors import UsageError
from mlserve.project import context_files
from mlserve.scaffold import TEMPLATES, InitResult, init_project, scaffold
from mlserve.validate import validate_app

BASE_FILES = {"app.py", "requirements.txt", "mlserve.yml", ".mlserveignore"}
EXPECTED = {
    "flask": BASE_FILES,
    "wsgi": BASE_FILES,
    "fastapi": BASE_FILES,
    "website": BASE_FILES | {"templates/index.html", "static/style.css", "static/app.js"},
}
KINDS = {
    "flask": ("flask.Flask", False),
    "wsgi": ("WSGI function", False),
    "fastapi": ("fastapi.FastAPI (ASGI)", True),
    "website": ("flask.Flask", False),
}
PREFIX = "http://localhost/serve/mkxjJa46aJBdwP4AEdKxfU/"


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


# -- what gets written ----------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES)
def test_each_template_writes_its_files(tmp_path, template):
    target = tmp_path / "demo"
    written = scaffold(target, "demo", template=template)
    assert files_in(target) == EXPECTED[template]
    assert {p.relative_to(target).as_posix() for p in written} == EXPECTED[template]
    assert written[0] == target / "app.py"


@pytest.mark.parametrize("template", TEMPLATES)
def test_each_scaffolded_app_passes_validation(tmp_path, template):
    scaffold(tmp_path, "demo", template=template)
    report = validate_app(tmp_path)
    assert (report.kind, report.asgi) == KINDS[template]


@pytest.mark.parametrize("template", TEMPLATES)
def test_app_py_shows_the_lock_helper_and_a_local_run(tmp_path, template):
    scaffold(tmp_path, "demo", template=template)
    source = (tmp_path / "app.py").read_text()
    assert "from mlserve_runtime import locked" in source
    assert "except ImportError:" in source
    assert "with locked(STATS_PATH):" in source
    assert 'os.environ.get("OUTPUT_DIR", "/tmp")' in source
    main = source[source.index('if __name__ == "__main__":'):]
    assert re.search(r"(app\.run|uvicorn\.run|make_server)\(.*127\.0\.0\.1", main, re.DOTALL)
    assert "{{" not in source and "{%" not in source
    compile(source, "app.py", "exec")


@pytest.mark.parametrize("template, needs", [
    ("flask", {"flask"}), ("website", {"flask"}), ("fastapi", {"fastapi", "python-multipart"}), ("wsgi", set()),
])
def test_requirements(tmp_path, template, needs):
    scaffold(tmp_path, None, template=template)
    lines = [line.split("#")[0].strip() for line in (tmp_path / "requirements.txt").read_text().splitlines()]
    assert {re.split(r"[<>=~!; ]", line)[0] for line in lines if line} == needs


@pytest.mark.parametrize("template", TEMPLATES)
def test_mlserve_yml_has_only_the_project_active(tmp_path, template):
    target = tmp_path / "Style Transfer"
    scaffold(target, "Style Transfer", template=template)
    text = (target / "mlserve.yml").read_text()
    assert yaml.safe_load(text) == {"project": "style-transfer"}
    assert load_config(target).project == "style-transfer"


def test_mlserve_yml_examples_are_valid_settings_when_uncommented(tmp_path):
    scaffold(tmp_path, "demo", template="fastapi")
    text = (tmp_path / "mlserve.yml").read_text()
    keys = set(re.findall(r"^# ([a-z_]+):", text, re.MULTILINE))
    assert keys == {"env", "workers", "data", "env_vars", "limits", "health", "max_runtime", "preload", "options"}
    assert keys <= {*TOP_LEVEL, "limits", "health"}
    uncommented = re.sub(r"^# ( *(?:[a-z_]+:|- ))", r"\1", text, flags=re.MULTILINE)
    (tmp_path / "mlserve.yml").write_text(uncommented)
    config = load_config(tmp_path)
    assert config.workers == 2 and config.data == ("./data:input",)
    assert config.limits == Limits(memory_bytes=2 << 30, cpus=1.5, pids=512)
    assert config.health == HealthPolicy(path="/health", method="GET")
    assert config.options == {"threshold": 0.5} and config.preload is False and config.max_runtime_s == 12 * 3600


def test_mlserveignore_keeps_data_and_clutter_out_of_the_image(tmp_path):
    scaffold(tmp_path, "demo", template="website")
    for junk in ("data/weights.bin", ".venv/bin/python", "__pycache__/app.cpython-311.pyc", ".git/HEAD", "output/x.json"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / junk).write_text("x")
    shipped = {rel for _, rel in context_files(tmp_path)}
    assert shipped == EXPECTED["website"]


def test_title_and_project_name_come_from_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "My Model"
    target.mkdir()
    monkeypatch.chdir(target)
    scaffold(Path.cwd(), None)
    assert 'TITLE = "My Model"' in (target / "app.py").read_text()
    assert "project: my-model" in (target / "mlserve.yml").read_text()


def test_website_page_is_a_flask_template_copied_as_it_is(tmp_path):
    scaffold(tmp_path, "demo", template="website")
    page = (tmp_path / "templates" / "index.html").read_text()
    assert "{{ url_for('static', filename='style.css') }}" in page
    assert "{{ url_for('index') }}" in page


# -- overwriting ------------------------------------------------------------------------------


def test_refuses_to_overwrite_and_writes_nothing(tmp_path):
    (tmp_path / "app.py").write_text("# mine\n")
    (tmp_path / "mlserve.yml").write_text("project: mine\n")
    with pytest.raises(UsageError) as info:
        scaffold(tmp_path, "demo")
    assert "app.py" in info.value.message and "mlserve.yml" in info.value.message
    assert "requirements.txt" not in info.value.message
    assert "--force" in info.value.hint
    assert (tmp_path / "app.py").read_text() == "# mine\n"
    assert (tmp_path / "mlserve.yml").read_text() == "project: mine\n"
    assert files_in(tmp_path) == {"app.py", "mlserve.yml"}


def test_force_overwrites(tmp_path):
    (tmp_path / "app.py").write_text("# mine\n")
    (tmp_path / "notes.txt").write_text("keep me\n")
    written = scaffold(tmp_path, "demo", force=True)
    assert tmp_path / "app.py" in written
    assert "app = Flask(__name__)" in (tmp_path / "app.py").read_text()
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_force_does_not_replace_a_folder(tmp_path):
    (tmp_path / "app.py").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        scaffold(tmp_path, "demo", force=True)
    assert files_in(tmp_path) == set()


def test_unknown_template_lists_the_choices(tmp_path):
    with pytest.raises(UsageError) as info:
        scaffold(tmp_path / "x", "x", template="django")
    assert "'django'" in info.value.message
    assert all(t in info.value.hint for t in TEMPLATES)
    assert not (tmp_path / "x").exists()


def test_target_that_is_a_file(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(UsageError, match="not a folder"):
        scaffold(tmp_path / "x", "x")


def test_creates_nested_target(tmp_path):
    scaffold(tmp_path / "a" / "b", "b", template="wsgi")
    assert (tmp_path / "a" / "b" / "app.py").is_file()


# -- init: an existing app keeps its files; a folder without one gets the template -------------------


MINE = "# mine\nfrom server import app\n"


def test_init_a_new_app_here_with_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = init_project(Path("."), "style", template="wsgi")
    assert result == InitResult(Path("."), "style", result.written)
    assert {p.as_posix() for p in result.written} == BASE_FILES
    assert yaml.safe_load((tmp_path / "mlserve.yml").read_text()) == {"project": "style"}
    assert result.summary()[-2:] == [f"Initialized project style in {tmp_path}", "Next: mlserve run --mode serve"]


def test_init_a_new_folder_quotes_it_in_the_next_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = init_project(Path("My Model"), None)
    assert result.project == "my-model"
    assert result.summary()[-1] == "Next: cd 'My Model' && mlserve run --mode serve"


def test_init_an_existing_app_touches_only_mlserve_yml(tmp_path):
    (tmp_path / "app.py").write_text(MINE)
    (tmp_path / "requirements.txt").write_text("torch\n")
    result = init_project(tmp_path, "style", template="fastapi", force=True)
    assert (result.project, result.config, result.written) == ("style", "created", [])
    assert files_in(tmp_path) == {"app.py", "requirements.txt", "mlserve.yml"}
    assert (tmp_path / "app.py").read_text() == MINE
    assert load_config(tmp_path).project == "style"
    assert "# health:\n#   path: /\n" in (tmp_path / "mlserve.yml").read_text()


def test_init_an_app_whose_app_py_is_a_dangling_link_still_counts_as_an_app(tmp_path):
    (tmp_path / "app.py").symlink_to("src/app.py")
    assert init_project(tmp_path, "style").config == "created"
    assert (tmp_path / "app.py").is_symlink() and not (tmp_path / "src").exists()


@pytest.mark.parametrize("before, after", [
    ("project: old\n", "project: new\n"),
    ("project:\n", "project: new\n"),
    ("project: My App   # mine\nworkers: 2\n", "project: new   # mine\nworkers: 2\n"),
    ("workers: 2\n", "project: new\nworkers: 2\n"),
    ("# settings\n\n# more\nworkers: 2\n", "# settings\n\n# more\nproject: new\nworkers: 2\n"),
    ("# settings\n---\nworkers: 2\n", "# settings\n---\nproject: new\nworkers: 2\n"),
    ("", "project: new\n"),
    ("# only comments\n", "# only comments\nproject: new\n"),
    ("# no newline at the end", "# no newline at the end\nproject: new\n"),
    ("options:\n  project: inner\nproject: old\n", "options:\n  project: inner\nproject: new\n"),
])
def test_init_sets_the_project_line_and_keeps_the_rest(tmp_path, before, after):
    (tmp_path / "app.py").write_text(MINE)
    (tmp_path / "mlserve.yml").write_text(before)
    result = init_project(tmp_path, "new")
    assert result.config == "updated"
    assert (tmp_path / "mlserve.yml").read_text() == after


@pytest.mark.parametrize("before, message", [
    ("{project: old, workers: 2}\n", "without changing more than that"),
    ("project: >\n  old\n", "without changing more than that"),
    ("project: [old\n", "is not valid YAML"),
    ("- project: old\n", "must be a mapping of settings, not list"),
])
def test_init_leaves_an_mlserve_yml_it_cannot_edit_safely_alone(tmp_path, before, message):
    (tmp_path / "app.py").write_text(MINE)
    (tmp_path / "mlserve.yml").write_text(before)
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        init_project(tmp_path, "new")
    assert "by hand" in info.value.hint
    assert (tmp_path / "mlserve.yml").read_text() == before


def test_init_checks_everything_before_writing(tmp_path):
    with pytest.raises(UsageError, match="not a valid project name"):
        init_project(tmp_path / "new", "Bad Name")
    with pytest.raises(UsageError, match="unknown template"):
        init_project(tmp_path / "new", "good", template="django")
    (tmp_path / "模型").mkdir()
    with pytest.raises(UsageError, match="no ASCII letters or digits"):
        init_project(tmp_path / "模型", None)
    with pytest.raises(UsageError, match="no ASCII letters or digits"):
        scaffold(tmp_path / "模型", None)
    assert files_in(tmp_path) == set() and not (tmp_path / "new").exists()


# -- the scaffolded apps, really running on the host ---------------------------------------------


class RecordingLock:
    """Stands in for mlserve_runtime.locked and records the data file as seen on entering and leaving."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None]] = []

    def __call__(self, path, timeout: float = 60):
        @contextmanager
        def held():
            self.events.append(("enter", str(path), self._read(path)))
            yield
            self.events.append(("exit", str(path), self._read(path)))

        return held()

    @staticmethod
    def _read(path) -> str | None:
        return Path(path).read_text() if Path(path).exists() else None


@pytest.fixture
def load(tmp_path, monkeypatch):
    """Scaffold a template, import its app.py as uWSGI would (a module), with OUTPUT_DIR in tmp_path."""

    def load_template(template: str):
        folder = tmp_path / template
        scaffold(folder, "demo", template=template)
        monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "output"))
        name = f"scaffolded_{template}_app"
        spec = importlib.util.spec_from_file_location(name, folder / "app.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
        lock = RecordingLock()
        monkeypatch.setattr(module, "locked", lock)
        return module, lock

    return load_template


def test_scaffolded_apps_use_the_runtime_helper_when_it_exists(tmp_path, monkeypatch):
    try:
        from mlserve_runtime import locked as expected
    except ImportError:
        expected = nullcontext
    for template in ("flask", "wsgi"):
        scaffold(tmp_path / template, "demo", template=template)
        monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "output"))
        spec = importlib.util.spec_from_file_location(f"helper_{template}", tmp_path / template / "app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.locked is expected


def test_flask_app_runs(load, tmp_path):
    module, lock = load("flask")
    client = module.app.test_client()
    index = client.get("/")
    assert index.status_code == 200 and "curl -F file=@" in index.get_json()["usage"]
    assert client.post("/", data={}).status_code == 400
    for count in (1, 2):
        answer = client.post("/", data={"file": (io.BytesIO(b"hello"), "in.txt")})
        assert answer.status_code == 200
        assert answer.get_json() == {"bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest(), "count": count}
    stats = tmp_path / "output" / "stats.json"
    assert [e for e, _, _ in lock.events] == ["enter", "exit", "enter", "exit"]
    assert lock.events[0] == ("enter", str(stats), None)
    assert lock.events[1] == ("exit", str(stats), '{"predictions": 1}')  # the file was written while the lock was held
    assert json.loads(stats.read_text()) == {"predictions": 2}


def test_wsgi_app_runs_under_an_endpoint_prefix(load, tmp_path):
    module, lock = load("wsgi")
    client = Client(module.app)
    index = client.get("/", base_url=PREFIX)
    assert index.status_code == 200 and json.loads(index.data)["app"] == "demo"
    assert client.get("/serve/abc").status_code == 404  # without SCRIPT_NAME, that path is not the app's /
    assert client.put("/", data=b"x").status_code == 405
    assert client.post("/", data=b"").status_code == 400
    answer = client.post("/", base_url=PREFIX, data=b"some bytes")
    assert answer.status_code == 200
    assert json.loads(answer.data) == {"bytes": 10, "sha256": hashlib.sha256(b"some bytes").hexdigest(), "count": 1}
    stats = tmp_path / "output" / "stats.json"
    assert lock.events == [("enter", str(stats), None), ("exit", str(stats), '{"predictions": 1}')]


def test_website_links_work_under_the_endpoint_prefix(load, tmp_path):
    module, lock = load("website")
    client = module.app.test_client()
    page = client.get("/", base_url=PREFIX)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "<title>demo</title>" in html
    assert 'href="/serve/mkxjJa46aJBdwP4AEdKxfU/static/style.css"' in html
    assert 'src="/serve/mkxjJa46aJBdwP4AEdKxfU/static/app.js"' in html
    assert 'action="/serve/mkxjJa46aJBdwP4AEdKxfU/"' in html
    assert '<span id="count">0</span>' in html
    css = client.get("/static/style.css", base_url=PREFIX)
    assert css.status_code == 200 and css.data == (tmp_path / "website" / "static" / "style.css").read_bytes()
    css.close()
    assert client.get("/static/app.js", base_url=PREFIX).status_code == 200
    assert client.post("/", base_url=PREFIX, data={}).status_code == 400

    answer = client.post("/", base_url=PREFIX, data={"file": (io.BytesIO(b"\x89PNG..."), "cat.png")})
    html = answer.get_data(as_text=True)
    assert answer.status_code == 200
    assert "cat.png" in html and hashlib.sha256(b"\x89PNG...").hexdigest() in html
    assert '<span id="count">1</span>' in html
    stats = tmp_path / "output" / "stats.json"
    assert ("exit", str(stats), '{"predictions": 1}') in lock.events
    assert json.loads(stats.read_text()) == {"predictions": 1}


def test_fastapi_app_runs_through_the_asgi_adapter(load, tmp_path):
    pytest.importorskip("fastapi")
    if not (find_spec("python_multipart") or find_spec("multipart")):
        pytest.skip("python-multipart is not installed")
    a2wsgi = pytest.importorskip("a2wsgi")
    module, lock = load("fastapi")
    client = Client(a2wsgi.ASGIMiddleware(module.app))
    index = client.get("/", base_url=PREFIX)
    assert index.status_code == 200 and json.loads(index.data)["app"] == "demo"
    assert json.loads(client.get("/health", base_url=PREFIX).data) == {"status": "ok"}
    docs = client.get("/docs", base_url=PREFIX)
    assert docs.status_code == 200 and b"/serve/mkxjJa46aJBdwP4AEdKxfU/openapi.json" in docs.data
    assert client.post("/predict", base_url=PREFIX).status_code == 422
    answer = client.post("/predict", base_url=PREFIX, data={"file": (io.BytesIO(b"hello"), "in.txt")})
    assert answer.status_code == 200, answer.data
    assert json.loads(answer.data) == {"bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest(), "count": 1}
    stats = tmp_path / "output" / "stats.json"
    assert lock.events == [("enter", str(stats), None), ("exit", str(stats), '{"predictions": 1}')]


def test_two_worker_processes_count_every_prediction(tmp_path):
    """Two processes, like two uWSGI workers, increment the same stats file through the scaffolded app."""
    pytest.importorskip("mlserve_runtime.lock")
    scaffold(tmp_path / "app", "demo", template="wsgi")
    worker = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('app', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert module.locked.__module__ == 'mlserve_runtime.lock', module.locked\n"
        "for _ in range(300): module.count_prediction()\n"
    )
    env = {**os.environ, "OUTPUT_DIR": str(tmp_path / "output")}
    workers = [subprocess.Popen([sys.executable, "-c", worker, str(tmp_path / "app" / "app.py")], env=env)
               for _ in range(2)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0]
    assert json.loads((tmp_path / "output" / "stats.json").read_text()) == {"predictions": 600}


def test_force_replaces_a_link_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "passwd"
    outside.write_text("root:x:0:0\n")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "requirements.txt").symlink_to(outside)
    with pytest.raises(UsageError, match="requirements.txt already exists"):
        scaffold(tmp_path / "repo", None)
    scaffold(tmp_path / "repo", None, force=True)
    assert outside.read_text() == "root:x:0:0\n"
    assert not (tmp_path / "repo" / "requirements.txt").is_symlink()


def test_a_linked_folder_on_the_way_out_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "static").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match=r"^static in .*repo links out of the folder"):
        scaffold(tmp_path / "repo", None, template="website", force=True)
    assert files_in(tmp_path) == set()
