"""Prediction and recommendation microservices with Seldon's internal API.

``GET /predict?json=<SeldonMessage>`` classifies iris flowers with a logistic regression trained,
when each worker imports this file, on the iris data that scikit-learn ships (no download).

``GET /recommend?user_id=..&recent_interactions=..&exclusion_items=..&limit=..`` recommends
catalogue items with an item-to-item cosine-similarity model fitted on an interaction log. The log
is simulated from a fixed seed (users favour one or two categories), so every worker builds the
same model; a real service would load its own log here.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flask import Flask, jsonify, request
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, normalize

app = Flask(__name__)


class BadParameter(Exception):
    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


@app.errorhandler(BadParameter)
def bad_parameter(exc: BadParameter):
    return jsonify(error="bad_parameter", parameter=exc.parameter, message=f"{exc.parameter}: {exc}"), 400


# --- prediction -------------------------------------------------------------------------------

iris = load_iris()
classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
ACCURACY = float(cross_val_score(classifier, iris.data, iris.target, cv=5).mean())
classifier.fit(iris.data, iris.target)
CLASS_NAMES = [str(name) for name in iris.target_names]
FEATURES = [name.replace(" (cm)", "").replace(" ", "_") for name in iris.feature_names]


def parse_features(message: object) -> np.ndarray:
    """Rows of 4 features from a SeldonMessage (``data.ndarray`` or ``data.tensor``) or a bare list."""
    if isinstance(message, dict):
        data = message.get("data")
        if not isinstance(data, dict):
            raise BadParameter("json", 'expected a SeldonMessage like {"data": {"ndarray": [[5.1, 3.5, 1.4, 0.2]]}}')
        if "ndarray" in data:
            rows = data["ndarray"]
        elif isinstance(data.get("tensor"), dict):
            tensor = data["tensor"]
            try:
                rows = np.asarray(tensor["values"], dtype=float).reshape(tensor["shape"]).tolist()
            except (KeyError, TypeError, ValueError) as exc:
                raise BadParameter("json", f"data.tensor needs matching shape and values ({exc})") from None
        else:
            raise BadParameter("json", "data needs an 'ndarray' or a 'tensor'")
    else:
        rows = message
    try:
        array = np.asarray(rows, dtype=float)
    except (TypeError, ValueError):
        raise BadParameter("json", "the features must be numbers") from None
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != len(FEATURES) or array.shape[0] == 0:
        raise BadParameter("json", f"each row needs {len(FEATURES)} features: {', '.join(FEATURES)}")
    if not np.isfinite(array).all():
        raise BadParameter("json", "the features must be finite numbers")
    return array


def _message() -> object:
    raw = request.values.get("json")
    if raw is None and request.is_json:
        return request.get_json(silent=True)
    if raw is None:
        raise BadParameter("json", "missing; e.g. ?json={\"data\":{\"ndarray\":[[5.1,3.5,1.4,0.2]]}}")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadParameter("json", f"not valid JSON ({exc})") from None


@app.route("/predict", methods=["GET", "POST"])
def predict():
    features = parse_features(_message())
    probabilities = classifier.predict_proba(features)
    predictions = []
    for row in probabilities:
        best = int(row.argmax())
        # Confidence: 1 minus the normalised entropy, 1 when the model is sure, 0 when all classes tie.
        entropy = -sum(p * math.log(p) for p in row if p > 0)
        predictions.append({
            "classId": best,
            "className": CLASS_NAMES[best],
            "score": round(float(row[best]), 6),
            "confidence": round(1 - entropy / math.log(len(row)), 6),
            "probabilities": {name: round(float(p), 6) for name, p in zip(CLASS_NAMES, row)},
        })
    return jsonify(predictions=predictions, meta={"model": "iris-logistic-regression", "cv_accuracy": ACCURACY})


# --- recommendation ---------------------------------------------------------------------------

N_USERS, N_CATEGORIES, ITEMS_PER_CATEGORY = 300, 6, 12
CATEGORIES = ["books", "music", "films", "games", "garden", "kitchen"]
ITEM_CATEGORY = {item: CATEGORIES[item // ITEMS_PER_CATEGORY] for item in range(N_CATEGORIES * ITEMS_PER_CATEGORY)}


def simulate_interactions(seed: int = 7) -> np.ndarray:
    """A users x items 0/1 matrix: each user mostly picks items from one or two favourite categories."""
    rng = np.random.default_rng(seed)
    n_items = len(ITEM_CATEGORY)
    matrix = np.zeros((N_USERS, n_items))
    for user in range(N_USERS):
        favourites = rng.choice(N_CATEGORIES, size=rng.integers(1, 3), replace=False)
        weights = np.full(n_items, 0.05)
        for category in favourites:
            weights[category * ITEMS_PER_CATEGORY:(category + 1) * ITEMS_PER_CATEGORY] = 1.0
        picks = rng.choice(n_items, size=rng.integers(4, 12), replace=False, p=weights / weights.sum())
        matrix[user, picks] = 1
    return matrix


INTERACTIONS = simulate_interactions()
item_vectors = normalize(INTERACTIONS.T)  # one row per item, unit length
SIMILARITY = item_vectors @ item_vectors.T  # cosine similarity, 0..1 for 0/1 data
np.fill_diagonal(SIMILARITY, 0)
POPULARITY = INTERACTIONS.sum(axis=0) / INTERACTIONS.sum(axis=0).max()


def _int_list(name: str) -> list[int]:
    raw = request.args.get(name, "").strip()
    if not raw:
        return []
    try:
        values = json.loads(raw) if raw.startswith("[") else [int(part) for part in raw.split(",")]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError
    except ValueError:
        raise BadParameter(name, f"expected comma-separated item ids or a JSON list of integers, not {raw!r}") from None
    return values


def _int(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(name, f"expected an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise BadParameter(name, f"must be from {low} to {high}, not {value}")
    return value


@app.get("/recommend")
def recommend():
    user_id = _int("user_id", None, 0, 2**63)
    recent = [item for item in _int_list("recent_interactions") if item in ITEM_CATEGORY]
    excluded = set(_int_list("exclusion_items"))
    limit = _int("limit", 10, 1, len(ITEM_CATEGORY))
    basis = "recent_interactions"
    if not recent and user_id is not None and user_id < N_USERS:
        recent, basis = [int(i) for i in np.flatnonzero(INTERACTIONS[user_id])], "user_history"
    if recent:
        scores = SIMILARITY[recent].mean(axis=0)  # mean cosine similarity: already 0..1
        scores = scores / scores.max() if scores.max() > 0 else scores
    else:
        scores, basis = POPULARITY.copy(), "popularity"  # nothing known: the most popular items
    excluded.update(recent)
    ranked = [int(item) for item in np.argsort(-scores, kind="stable") if int(item) not in excluded]
    return jsonify(
        recommended=[{"item": item, "score": round(float(scores[item]), 6), "category": ITEM_CATEGORY[item]}
                     for item in ranked[:limit]],
        meta={"model": "item-cosine-similarity", "basis": basis},
    )


@app.get("/items")
def items():
    return jsonify(items=[{"item": item, "category": category} for item, category in ITEM_CATEGORY.items()])


@app.get("/")
def usage():
    return jsonify(
        predict='/predict?json={"data":{"names":' + json.dumps(FEATURES) + ',"ndarray":[[5.1,3.5,1.4,0.2]]}}',
        recommend="/recommend?user_id=1&recent_interactions=3,5&exclusion_items=4&limit=5",
        items="/items",
        cv_accuracy=ACCURACY,
    )


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=5000)
