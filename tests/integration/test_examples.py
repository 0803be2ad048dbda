"""Every example in examples/ deployed for real (image build, Docker, nginx gateway) and used the
way its users would. One deployment per example, shared by the module's tests."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from tests.harness import EXAMPLES

pytestmark = pytest.mark.integration


def deploy(mlserve, tmp_path_factory, name: str, *args: str) -> tuple[Path, dict]:
    """Copy examples/NAME (the folder's name is the project's) and run it in serve mode."""
    project = tmp_path_factory.mktemp("examples") / name
    shutil.copytree(EXAMPLES / name, project, ignore=shutil.ignore_patterns("__pycache__"))
    return project, mlserve.json("run", "--mode", "serve", *args, cwd=project)


def picture_bytes(size: tuple[int, int] = (400, 300), fmt: str = "JPEG") -> bytes:
    """A colourful test picture: an RGB gradient with a few shapes."""
    width, height = size
    x = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, axis=1)
    rgb = np.stack([x, y, 255 - x], axis=2).astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 40, 160, 160), fill=(250, 220, 40))
    draw.rectangle((220, 150, 360, 260), fill=(30, 120, 60))
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=95)
    return buffer.getvalue()


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a.convert("RGB"), float) - np.asarray(b.convert("RGB"), float)).mean())


def assert_json_400(answer: requests.Response, error: str, **fields) -> dict:
    assert answer.status_code == 400, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    payload = answer.json()
    assert payload["error"] == error, payload
    for key, value in fields.items():
        assert payload[key] == value, payload
    return payload


# --- style-transfer: image in, image out, parameters from a --data mount --------------------------

@pytest.fixture(scope="module")
def style_transfer(mlserve_module, tmp_path_factory):
    return deploy(mlserve_module, tmp_path_factory, "style-transfer", "--data", "./params:input")


def test_style_transfer_restyles_an_upload_in_proportion_to_strength(style_transfer):
    _, out = style_transfer
    original_bytes = picture_bytes()
    original = Image.open(io.BytesIO(original_bytes))
    differences = {}
    for strength in ("0", "0.5", "1"):
        # The project endpoint without a trailing slash takes the POST: no redirect.
        answer = requests.post(out["project_endpoint"], files={"file": ("in.jpg", original_bytes, "image/jpeg")},
                               data={"style": "sepia", "strength": strength}, allow_redirects=False, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"] == "image/jpeg"
        assert answer.headers["X-Style"] == "sepia"
        result = Image.open(io.BytesIO(answer.content))
        assert result.format == "JPEG" and result.size == original.size
        differences[strength] = mean_difference(result, original)
    assert differences["0"] < 3  # strength 0 is the input, give or take JPEG
    assert differences["0"] < differences["0.5"] < differences["1"]
    assert 0.35 < differences["0.5"] / differences["1"] < 0.65


def test_style_transfer_styles_differ_and_come_from_the_mounted_params(style_transfer):
    project, out = style_transfer
    listing = requests.get(out["endpoint"], timeout=10).json()
    assert set(listing["styles"]) == {"ukiyoe", "sepia", "pencil", "nocturne"}
    picture = picture_bytes()
    results = {}
    for style in ("ukiyoe", "pencil"):
        answer = requests.post(out["endpoint"] + "/", files={"file": ("in.jpg", picture)}, data={"style": style},
                               timeout=60)
        assert answer.status_code == 200, answer.text
        results[style] = Image.open(io.BytesIO(answer.content))
    assert mean_difference(results["ukiyoe"], results["pencil"]) > 20

    # The params folder is mounted, not baked in: a new style is served without a rebuild.
    styles_file = project / "params" / "styles.json"
    book = json.loads(styles_file.read_text())
    book["styles"]["negative"] = {"description": "a photographic negative",
                                  "matrix": [[-1, 0, 0], [0, -1, 0], [0, 0, -1]], "bias": [1, 1, 1]}
    styles_file.write_text(json.dumps(book))
    assert "negative" in requests.get(out["endpoint"], timeout=10).json()["styles"]
    answer = requests.post(out["endpoint"], files={"file": ("in.jpg", picture)}, data={"style": "negative"},
                           timeout=60)
    assert answer.status_code == 200, answer.text
    negative = np.asarray(Image.open(io.BytesIO(answer.content)), float)
    assert abs(negative.mean() - (255 - np.asarray(Image.open(io.BytesIO(picture)), float).mean())) < 5


def test_style_transfer_bad_uploads_get_400_with_a_json_reason(style_transfer, tmp_path):
    _, out = style_transfer
    url = out["project_endpoint"]
    assert_json_400(requests.post(url, data={"style": "sepia"}, timeout=10), "no_file", field="file")
    assert_json_400(requests.post(url, files={"file": ("notes.txt", b"no picture here\n")}, timeout=10),
                    "not_an_image", field="file")
    too_big = tmp_path / "huge.jpg"
    too_big.write_bytes(picture_bytes() + b"\0" * (11 * 2**20))  # the app's limit is 10 MB (mlserve.yml)
    with too_big.open("rb") as handle:
        payload = assert_json_400(requests.post(url, files={"file": handle}, timeout=60), "too_large", field="file")
    assert payload["limit_bytes"] == 10 * 2**20
    picture = picture_bytes()
    assert_json_400(requests.post(url, files={"file": ("a.jpg", picture)}, data={"strength": "2"}, timeout=10),
                    "bad_parameter", field="strength")
    assert_json_400(requests.post(url, files={"file": ("a.jpg", picture)}, data={"style": "cubism"}, timeout=10),
                    "bad_parameter", field="style")


# --- seldon-microservices: /predict and /recommend --------------------------------------------------

@pytest.fixture(scope="module")
def seldon(mlserve_module, tmp_path_factory):
    return deploy(mlserve_module, tmp_path_factory, "seldon-microservices")[1]


def test_seldon_predict_classifies_iris_flowers(seldon):
    url = seldon["project_endpoint"] + "/predict"
    message = {"data": {"names": ["sepal_length", "sepal_width", "petal_length", "petal_width"],
                        "ndarray": [[5.0, 3.4, 1.5, 0.2], [6.9, 3.1, 5.6, 2.2], [5.8, 2.7, 4.1, 1.0]]}}
    answer = requests.get(url, params={"json": json.dumps(message)}, timeout=10)
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert [p["classId"] for p in predictions] == [0, 2, 1]
    assert [p["className"] for p in predictions] == ["setosa", "virginica", "versicolor"]
    setosa = predictions[0]
    assert setosa["score"] > 0.9 and setosa["confidence"] > 0.7
    for p in predictions:
        assert 0 <= p["confidence"] <= 1 and abs(sum(p["probabilities"].values()) - 1) < 1e-3
        assert p["score"] == max(p["probabilities"].values())
    tensor = {"data": {"tensor": {"shape": [1, 4], "values": [6.3, 3.3, 6.0, 2.5]}}}
    assert requests.post(url, data={"json": json.dumps(tensor)}, timeout=10).json()["predictions"][0]["classId"] == 2


def test_seldon_recommend_honours_exclusions_and_limit_with_normalised_scores(seldon):
    base = seldon["endpoint"]
    catalogue = {i["item"]: i["category"] for i in requests.get(base + "/items", timeout=10).json()["items"]}
    recent = [0, 1, 2]  # all books
    answer = requests.get(base + "/recommend", timeout=10, params={
        "user_id": "7", "recent_interactions": ",".join(map(str, recent)), "exclusion_items": "3,4", "limit": "5"})
    assert answer.status_code == 200, answer.text
    recommended = answer.json()["recommended"]
    items = [r["item"] for r in recommended]
    scores = [r["score"] for r in recommended]
    assert len(items) == 5 and len(set(items)) == 5
    assert not set(items) & {0, 1, 2, 3, 4}
    assert all(0 <= s <= 1 for s in scores) and scores == sorted(scores, reverse=True)
    assert catalogue[items[0]] == "books"  # similar to what the user just looked at
    everything = requests.get(base + "/recommend", params={"limit": str(len(catalogue))}, timeout=10).json()
    assert len(everything["recommended"]) == len(catalogue)
    assert max(r["score"] for r in everything["recommended"]) == 1.0


@pytest.mark.parametrize("parameter, value", [
    ("json", "{not json"), ("json", '{"data": {"ndarray": [[1, 2]]}}'), ("user_id", "alice"),
    ("recent_interactions", "1,two"), ("exclusion_items", "[1.5]"), ("limit", "0"), ("limit", "many"),
])
def test_seldon_malformed_parameters_get_400_naming_them(seldon, parameter, value):
    path = "/predict" if parameter == "json" else "/recommend"
    answer = requests.get(seldon["endpoint"] + path, params={parameter: value}, timeout=10)
    payload = assert_json_400(answer, "bad_parameter", parameter=parameter)
    assert parameter in payload["message"]


# --- fastapi-predict: an ASGI app through a2wsgi ----------------------------------------------------

@pytest.fixture(scope="module")
def fastapi(mlserve_module, tmp_path_factory):
    return deploy(mlserve_module, tmp_path_factory, "fastapi-predict")[1]


def test_fastapi_health_and_predict(fastapi):
    base = fastapi["project_endpoint"]
    health = requests.get(base + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    flower = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}
    answer = requests.post(base + "/predict", json=flower, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["species"] == "virginica" and answer.json()["confidence"] > 0.9
    invalid = requests.post(base + "/predict", json={**flower, "petal_width": -1}, timeout=10)
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["loc"] == ["body", "petal_width"]


@pytest.mark.parametrize("which", ["endpoint", "project_endpoint"])
def test_fastapi_docs_work_under_the_endpoint_prefix(mlserve_module, fastapi, which):
    base = fastapi[which]
    docs = requests.get(base + "/docs", timeout=10)
    assert docs.status_code == 200 and "swagger-ui" in docs.text
    openapi_url = re.search(r"url: '([^']+)'", docs.text).group(1)
    prefix = base.removeprefix(mlserve_module.url)
    assert openapi_url == f"{prefix}/openapi.json"
    schema = requests.get(mlserve_module.url + openapi_url, timeout=10)
    assert schema.status_code == 200 and schema.json()["info"]["title"] == "Iris species API"
    assert "/predict" in schema.json()["paths"]


# --- wsgi-stream: a plain WSGI function, streaming, and the lock helper -----------------------------

@pytest.fixture(scope="module")
def wsgi_stream(mlserve_module, tmp_path_factory):
    return deploy(mlserve_module, tmp_path_factory, "wsgi-stream")[1]


def test_wsgi_streams_a_large_response(wsgi_stream):
    block = bytes(range(256)) * 4096
    expected = hashlib.sha256(block * 50).hexdigest()
    digest, total = hashlib.sha256(), 0
    with requests.get(wsgi_stream["endpoint"] + "/stream", params={"mb": "50"}, stream=True, timeout=60) as answer:
        assert answer.status_code == 200
        assert answer.headers["Content-Length"] == str(50 * 2**20)
        for chunk in answer.iter_content(chunk_size=1 << 20):
            digest.update(chunk)
            total += len(chunk)
    assert total == 50 * 2**20 and digest.hexdigest() == expected

    with requests.get(wsgi_stream["project_endpoint"] + "/predictions", params={"rows": "200000"}, stream=True,
                      timeout=60) as answer:
        assert answer.status_code == 200
        lines = sum(chunk.count(b"\n") for chunk in answer.iter_content(chunk_size=1 << 16))
    assert lines == 200_001  # header + rows
    bad = requests.get(wsgi_stream["endpoint"] + "/stream", params={"mb": "lots"}, timeout=10)
    assert_json_400(bad, "bad_parameter")


def _hammer_counter(url: str, requests_total: int, lock: int) -> set[int]:
    def one(_: int) -> int:
        answer = requests.post(url, params={"lock": str(lock)}, timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.json()["pid"]

    with ThreadPoolExecutor(16) as pool:
        return set(pool.map(one, range(requests_total)))


def test_lock_helper_counts_every_increment_across_both_workers(wsgi_stream):
    url = wsgi_stream["endpoint"] + "/counter"
    assert requests.delete(url, timeout=10).json() == {"count": 0}
    pids = _hammer_counter(url, 200, lock=1)
    assert len(pids) == 2  # both uWSGI workers wrote the file
    assert requests.get(url, timeout=10).json() == {"count": 200}

    # Without the lock the same two workers lose increments: the race the helper prevents.
    requests.delete(url, timeout=10)
    _hammer_counter(url, 200, lock=0)
    assert requests.get(url, timeout=10).json()["count"] < 200
