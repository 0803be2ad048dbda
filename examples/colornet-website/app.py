"""A website on the endpoint, the ColorNet pattern: an upload page that colourises a picture.

``GET /`` serves an HTML page whose CSS and JavaScript come from ``/static`` under the endpoint's
prefix (``url_for`` builds every link from SCRIPT_NAME, so the page works at ``/serve/<id>`` and
``/serve/<id>/`` alike). The page posts the picture to ``/colorize`` with ``fetch`` and shows the
result. The colouriser maps each pixel's luminance through a palette (a gradient map); ColorNet
used a neural network, this stands in for it without downloading weights.
"""

from __future__ import annotations

import io

import numpy as np
from flask import Flask, jsonify, render_template, request, send_file
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_SIDE = 1600
Image.MAX_IMAGE_PIXELS = 40_000_000

# Colour stops from shadows to highlights: (position 0..1, RGB).
PALETTES: dict[str, list[tuple[float, tuple[int, int, int]]]] = {
    "sunset": [(0.0, (20, 10, 40)), (0.35, (140, 30, 70)), (0.65, (240, 120, 50)), (1.0, (255, 240, 190))],
    "ocean": [(0.0, (5, 15, 40)), (0.4, (20, 80, 140)), (0.75, (80, 190, 200)), (1.0, (235, 255, 250))],
    "forest": [(0.0, (15, 25, 10)), (0.4, (50, 100, 40)), (0.7, (170, 180, 90)), (1.0, (250, 245, 215))],
    "sepia": [(0.0, (30, 20, 10)), (0.5, (150, 110, 70)), (1.0, (255, 240, 210))],
}

app = Flask(__name__)


def palette_lut(stops: list[tuple[float, tuple[int, int, int]]]) -> np.ndarray:
    """A 256x3 lookup table interpolating the palette's colour stops."""
    positions = np.array([p for p, _ in stops]) * 255
    colours = np.array([c for _, c in stops], dtype=np.float64)
    levels = np.arange(256)
    return np.stack([np.interp(levels, positions, colours[:, k]) for k in range(3)], axis=1).astype(np.uint8)


LUTS = {name: palette_lut(stops) for name, stops in PALETTES.items()}


def colorize(image: Image.Image, palette: str) -> Image.Image:
    """Equalise the luminance, then look every pixel up in the palette."""
    gray = ImageOps.equalize(ImageOps.grayscale(image))
    return Image.fromarray(LUTS[palette][np.asarray(gray)])


def error(code: str, message: str, status: int = 400):
    return jsonify(error=code, message=message), status


@app.get("/")
def index():
    return render_template("index.html", palettes=list(PALETTES), max_mb=MAX_UPLOAD_BYTES // 2**20)


@app.post("/colorize")
def colorize_upload():
    upload = request.files.get("file")
    if upload is None:
        return error("no_file", "choose a picture to upload (form field 'file')")
    palette = request.form.get("palette", "sunset")
    if palette not in LUTS:
        return error("bad_parameter", f"unknown palette {palette!r}; palettes: {', '.join(PALETTES)}")
    data = upload.stream.read(MAX_UPLOAD_BYTES + 1)
    if not data:
        return error("no_file", "the uploaded file is empty")
    if len(data) > MAX_UPLOAD_BYTES:
        return error("too_large", f"the picture is over {MAX_UPLOAD_BYTES // 2**20} MB")
    try:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (MAX_SIDE, MAX_SIDE))
        image = ImageOps.exif_transpose(image).convert("RGB")
    except Image.DecompressionBombError:
        return error("too_large", "the picture has too many pixels")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return error("not_an_image", f"{upload.filename or 'the upload'} is not a picture this site can read")
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    buffer = io.BytesIO()
    colorize(image, palette).save(buffer, "PNG", optimize=False)
    buffer.seek(0)
    return send_file(buffer, mimetype="image/png", download_name=f"colorized-{palette}.png")


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=5000)
