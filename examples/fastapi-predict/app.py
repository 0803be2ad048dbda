"""A FastAPI microservice: /health, /predict and the interactive /docs.

``app`` is an ASGI application; mlserve sees that and serves it under uWSGI through a2wsgi, which
hands the endpoint's prefix to FastAPI as ``root_path``, so /docs finds its openapi.json under
``/serve/<id>``. The model is a Gaussian naive Bayes classifier in NumPy, fitted at import on
iris.csv, the 150-flower iris data (R. A. Fisher, 1936) shipped beside this file.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

DATA = Path(__file__).with_name("iris.csv")


class GaussianNaiveBayes:
    """Per-class feature means and variances; the class with the highest posterior wins."""

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "GaussianNaiveBayes":
        self.classes = np.unique(labels)
        self.means = np.array([features[labels == c].mean(axis=0) for c in self.classes])
        self.variances = np.array([features[labels == c].var(axis=0) for c in self.classes]) + 1e-9
        self.log_priors = np.log(np.array([(labels == c).mean() for c in self.classes]))
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        diff = features[:, None, :] - self.means[None, :, :]
        log_likelihood = -0.5 * (np.log(2 * np.pi * self.variances)[None] + diff**2 / self.variances[None]).sum(axis=2)
        joint = log_likelihood + self.log_priors
        joint -= joint.max(axis=1, keepdims=True)
        probabilities = np.exp(joint)
        return probabilities / probabilities.sum(axis=1, keepdims=True)


def load_iris(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    features = np.array([[float(row[name]) for name in FEATURES] for row in rows])
    return features, np.array([row["species"] for row in rows])


FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
X, y = load_iris(DATA)
model = GaussianNaiveBayes().fit(X, y)
TRAINING_ACCURACY = float((model.classes[model.predict_proba(X).argmax(axis=1)] == y).mean())


class Flower(BaseModel):
    """One iris flower's measurements, in centimetres."""

    sepal_length: float = Field(gt=0, lt=30, examples=[5.1])
    sepal_width: float = Field(gt=0, lt=30, examples=[3.5])
    petal_length: float = Field(gt=0, lt=30, examples=[1.4])
    petal_width: float = Field(gt=0, lt=30, examples=[0.2])


class Prediction(BaseModel):
    species: str
    confidence: float
    probabilities: dict[str, float]


class Health(BaseModel):
    status: str
    model: str
    training_accuracy: float


app = FastAPI(
    title="Iris species API",
    version="1.0.0",
    description="Predicts an iris flower's species from its measurements; served by mlserve.",
)


@app.get("/health", response_model=Health)
def health() -> Health:
    return Health(status="ok", model="gaussian-naive-bayes", training_accuracy=TRAINING_ACCURACY)


@app.post("/predict", response_model=Prediction)
def predict(flower: Flower) -> Prediction:
    row = np.array([[getattr(flower, name) for name in FEATURES]])
    probabilities = model.predict_proba(row)[0]
    best = int(probabilities.argmax())
    return Prediction(
        species=str(model.classes[best]),
        confidence=round(float(probabilities[best]), 6),
        probabilities={str(c): round(float(p), 6) for c, p in zip(model.classes, probabilities)},
    )


@app.get("/")
def index(request: Request) -> dict[str, str]:
    root = request.scope.get("root_path", "").rstrip("/")  # the endpoint's prefix, from SCRIPT_NAME
    return {"docs": f"{root}/docs", "health": f"{root}/health", "predict": f"POST {root}/predict"}
