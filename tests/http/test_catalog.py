"""``GET /v1/models`` and the JSON API at every version, through a real server."""

from __future__ import annotations

from typing import Any, ClassVar

import httpx
import numpy as np

from asyncserve import Model, Service, Tensor
from asyncserve.http.openapi import row_schema
from asyncserve.model import describe
from tests.models import AdderV1, AdderV2, Echo


class NoWeights(Model):
    """Its weights are not where it looks: it never becomes ready."""

    name = "no-weights"
    inputs: ClassVar = {"x": Tensor("float32")}
    outputs: ClassVar = {"y": Tensor("float32")}

    def load(self) -> None:
        self.weights = np.load("/no/such/weights.npy")

    async def predict(self, x: Any) -> Any:  # async: it loads on its own, beside the executor's models
        return x


SERVICE = Service(AdderV1(), AdderV2(), Echo(), NoWeights(), name="catalog")
ROW = {"a": [1, 2, 3], "b": [4, 5, 6]}


async def _models(client: httpx.AsyncClient) -> dict[str, Any]:
    answer = await client.get("/v1/models")
    assert answer.status_code == 200, answer.text
    return {model["name"]: model for model in answer.json()["models"]}


async def test_every_model_and_version_is_listed_highest_first(client: httpx.AsyncClient) -> None:
    models = await _models(client)
    assert list(models) == ["adder", "shout", "no-weights"]
    adder = models["adder"]
    assert adder["latest"] == "2"
    assert [(v["version"], v["predict"]) for v in adder["versions"]] == [
        ("2", "/v1/models/adder/versions/2/predict"),
        ("1", "/v1/models/adder/versions/1/predict"),
    ]
    assert models["shout"]["latest"] is None
    assert [v["predict"] for v in models["shout"]["versions"]] == ["/v1/models/shout/predict"]


async def test_each_version_says_whether_it_is_ready_and_why_not(client: httpx.AsyncClient) -> None:
    models = await _models(client)
    (_, adder_1) = models["adder"]["versions"]
    assert (adder_1["state"], adder_1["ready"], adder_1["reason"]) == ("READY", True, None)
    (broken,) = models["no-weights"]["versions"]
    assert (broken["state"], broken["ready"]) == ("UNAVAILABLE", False)
    assert broken["reason"].startswith("load failed: FileNotFoundError: ")
    assert "/no/such/weights.npy" in broken["reason"]


async def test_each_version_gives_the_schemas_of_its_rows(client: httpx.AsyncClient) -> None:
    models = await _models(client)
    (adder_2, _) = models["adder"]["versions"]
    spec = describe(AdderV2())
    assert adder_2["inputs"] == row_schema(spec.inputs)
    assert adder_2["outputs"] == row_schema(spec.outputs, outputs=True)
    assert adder_2["inputs"]["required"] == ["a", "b"]
    assert adder_2["inputs"]["properties"]["a"]["maxItems"] == 3
    assert adder_2["streams"] is False


async def test_the_json_api_serves_each_version_at_its_own_path(client: httpx.AsyncClient) -> None:
    first = await client.post("/v1/models/adder/versions/1/predict", json=ROW)
    second = await client.post("/v1/models/adder/versions/2/predict", json=ROW)
    latest = await client.post("/v1/models/adder/predict", json=ROW)
    assert first.json()["sum"] == [5.0, 7.0, 9.0]  # version 1 adds
    assert second.json()["sum"] == [6.0, 8.0, 10.0]  # version 2 adds one more
    assert latest.json() == second.json()
    rows = await client.post("/v1/models/adder/versions/1/predict", json=[ROW, ROW])
    assert [row["total"] for row in rows.json()] == [21.0, 21.0]


async def test_an_unknown_version_is_a_404_that_names_the_versions(client: httpx.AsyncClient) -> None:
    answer = await client.post("/v1/models/adder/versions/3/predict", json=ROW)
    assert answer.status_code == 404
    body = answer.json()
    assert body["code"] == "model_not_found"
    assert "'3'" in body["error"]
    assert "2, 1" in body["error"]


async def test_a_version_that_is_not_ready_answers_503_with_its_reason(client: httpx.AsyncClient) -> None:
    answer = await client.post("/v1/models/no-weights/predict", json={"x": 1.0})
    assert answer.status_code == 503
    assert "FileNotFoundError" in answer.json()["error"]


async def test_the_openapi_document_has_the_list_and_every_version(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    paths = document["paths"]
    assert paths["/v1/models"]["get"]["operationId"] == "list_models"
    for version in ("1", "2"):
        operation = paths[f"/v1/models/adder/versions/{version}/predict"]["post"]
        assert operation["operationId"] == f"predict_adder_version_{version}"
        schema = operation["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]
        assert schema == {"$ref": f"#/components/schemas/adder.v{version}.Inputs"}
    assert "/v1/models/adder/predict" in paths
    assert "/v1/models/shout/versions/None/predict" not in paths
    listed = document["components"]["schemas"]["ModelList"]
    version_fields = listed["properties"]["models"]["items"]["properties"]["versions"]["items"]["required"]
    answer = (await client.get("/v1/models")).json()
    assert sorted(answer["models"][0]["versions"][0]) == sorted(version_fields)
