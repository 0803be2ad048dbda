"""Image in, image out: the FloydHub style-transfer pattern on mlserve.

POST an image as the multipart field ``file`` (and optionally ``style`` and ``strength``) and get
the restyled picture back as a JPEG. The styles are not baked into the image: they are read from
``styles.json`` in the folder mounted at /input (``mlserve run --mode serve --data ./params:input``),
and re-read when that file changes, so a new "model" is served without rebuilding.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request, send_file
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

PARAMS_DIR = Path(os.environ.get("STYLE_PARAMS_DIR", "/input"))
MAX_SIDE = 2048  # larger pictures are scaled down before styling
Image.MAX_IMAGE_PIXELS = 40_000_000  # a decompression bomb is refused, not decoded


def _options() -> dict:
    """The ``options`` of mlserve.yml, from the manifest mlserve writes for every job."""
    try:
        manifest = json.loads(Path(os.environ["MANIFEST_FILE"]).read_text())
    except (KeyError, OSError, ValueError):
        return {}
    return manifest.get("options") or {}


MAX_UPLOAD_BYTES = int(float(_options().get("max_upload_mb", 10)) * 1024 * 1024)

app = Flask(__name__)


class BadRequest(Exception):
    def __init__(self, error: str, message: str, **extra) -> None:
        super().__init__(message)
        self.payload = {"error": error, "message": message, **extra}


@app.errorhandler(BadRequest)
def bad_request(exc: BadRequest):
    return jsonify(exc.payload), 400


class StyleBook:
    """styles.json from the data mount, reloaded when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._mtime: float | None = None
        self._styles: dict = {}
        self.default = ""

    def load(self) -> dict:
        mtime = self.path.stat().st_mtime  # FileNotFoundError when nothing is mounted
        if mtime != self._mtime:
            book = json.loads(self.path.read_text())
            self._styles, self.default, self._mtime = book["styles"], book.get("default", ""), mtime
        return self._styles


styles = StyleBook(PARAMS_DIR / "styles.json")


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _edges(gray: np.ndarray) -> np.ndarray:
    """Gradient magnitude of a slightly blurred luminance, scaled to 0..1."""
    blurred = np.asarray(Image.fromarray((gray * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)),
                         dtype=np.float32) / 255
    gy, gx = np.gradient(blurred)
    magnitude = np.hypot(gx, gy)
    return np.clip(magnitude / (np.percentile(magnitude, 99) + 1e-6), 0, 1)


def stylize(image: Image.Image, style: dict, strength: float) -> Image.Image:
    """Apply one style's pipeline (saturation, colour matrix, posterize, ink edges, pencil, vignette)."""
    rgb = np.asarray(image, dtype=np.float32) / 255
    out = rgb.copy()
    gray = _luma(rgb)
    if "saturation" in style:
        out = gray[..., None] + (out - gray[..., None]) * float(style["saturation"])
    if "matrix" in style:
        out = out @ np.asarray(style["matrix"], dtype=np.float32).T + np.asarray(style.get("bias", [0, 0, 0]),
                                                                                 dtype=np.float32)
    if style.get("posterize"):
        levels = float(style["posterize"]) - 1
        out = np.round(np.clip(out, 0, 1) * levels) / levels
    if style.get("pencil"):
        # Colour dodge of the luminance with its blurred negative: a pencil drawing.
        inverted = Image.fromarray(((1 - gray) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(6))
        blur = np.asarray(inverted, dtype=np.float32) / 255
        sketch = np.clip(gray / np.maximum(1 - blur, 1e-3), 0, 1) ** 2
        tint = np.asarray(style.get("paper", [1, 1, 1]), dtype=np.float32)
        out = sketch[..., None] * tint
    if style.get("ink"):
        out = out * (1 - float(style["ink"]) * _edges(gray))[..., None]
    if style.get("vignette"):
        h, w = gray.shape
        y, x = np.ogrid[-1:1:complex(0, h), -1:1:complex(0, w)]
        out = out * (1 - float(style["vignette"]) * np.clip(x * x + y * y - 0.3, 0, None))[..., None]
    mixed = (1 - strength) * rgb + strength * np.clip(out, 0, 1)
    return Image.fromarray(np.round(mixed * 255).astype(np.uint8))


def _read_upload() -> Image.Image:
    upload = request.files.get("file")
    if upload is None:
        raise BadRequest("no_file", "send an image as the multipart form field 'file'", field="file")
    data = upload.stream.read(MAX_UPLOAD_BYTES + 1)
    if not data:
        raise BadRequest("no_file", "the uploaded file 'file' is empty", field="file")
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadRequest("too_large", f"the image is over this app's limit of {MAX_UPLOAD_BYTES // 2**20} MB",
                         field="file", limit_bytes=MAX_UPLOAD_BYTES)
    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale, cheaply
        image = ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError:
        raise BadRequest("too_large", f"the image has more than {Image.MAX_IMAGE_PIXELS} pixels",
                         field="file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise BadRequest("not_an_image", f"{upload.filename or 'the upload'!r} is not an image Pillow can read",
                         field="file") from None
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    return image


def _strength() -> float:
    raw = request.values.get("strength", "1.0")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise BadRequest("bad_parameter", f"strength must be a number from 0 to 1, not {raw!r}", field="strength")
    return value


def _book() -> dict:
    try:
        return styles.load()
    except FileNotFoundError:
        raise BadRequest("no_styles", f"no {styles.path} in this instance: mount the params folder with "
                         "`mlserve run --mode serve --data ./params:input`") from None


@app.get("/")
def usage():
    try:
        book = styles.load()
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return jsonify(error="no_styles", message=f"cannot read {styles.path}: {exc}"), 503
    return jsonify(
        usage='curl -o out.jpg -F "file=@in.jpg" -F style=ukiyoe -F strength=0.8 <this endpoint>',
        styles={name: s.get("description", "") for name, s in book.items()},
        default_style=styles.default,
        max_upload_bytes=MAX_UPLOAD_BYTES,
    )


@app.post("/")
def transfer():
    book = _book()
    name = request.values.get("style") or styles.default
    if name not in book:
        raise BadRequest("bad_parameter", f"unknown style {name!r}; styles: {', '.join(sorted(book))}",
                         field="style")
    strength = _strength()
    image = _read_upload()
    result = stylize(image, book[name], strength)
    buffer = io.BytesIO()
    result.save(buffer, "JPEG", quality=90)
    buffer.seek(0)
    response = send_file(buffer, mimetype="image/jpeg", download_name=f"{name}.jpg")
    response.headers["X-Style"] = name
    response.headers["X-Strength"] = str(strength)
    return response


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=5000)
