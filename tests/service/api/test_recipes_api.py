"""/v1/recipes: presets + user recipes, validation naming the bad field."""

from __future__ import annotations

from fastapi.testclient import TestClient

from quant.recipes.presets import list_presets
from quant.recipes.schema import SmoothQuantParams


def test_lists_presets_and_own_recipes(client: TestClient, auth: dict[str, str], other_auth: dict[str, str]) -> None:
    body = {"name": "mine-w4", "recipe": {"method": {"name": "rtn"}, "weight": {"bits": 4}}}
    assert client.post("/v1/recipes", json=body, headers=auth).status_code == 201
    assert client.post("/v1/recipes", json=body, headers=auth).status_code == 409
    items = client.get("/v1/recipes", headers=auth).json()["items"]
    presets = [i["name"] for i in items if i["source"] == "preset"]
    assert presets == list_presets()
    mine = [i for i in items if i["source"] == "user"]
    assert [i["name"] for i in mine] == ["mine-w4"]
    assert mine[0]["recipe"]["weight"]["bits"] == 4
    other = client.get("/v1/recipes", headers=other_auth).json()["items"]
    assert not [i for i in other if i["source"] == "user"]


def test_validate_fills_defaults(client: TestClient, auth: dict[str, str]) -> None:
    r = client.post("/v1/recipes/validate", json={"recipe": {"method": {"name": "smoothquant", "alpha": 0.6}}},
                    headers=auth)
    assert r.status_code == 200, r.text
    method = r.json()["recipe"]["method"]
    assert method == {**SmoothQuantParams().model_dump(mode="json"), "alpha": 0.6}
    assert method["name"] == "smoothquant" and "alpha_grid" in method  # defaults filled
    assert r.json()["bits_label"] == "W8A8"


def test_validate_422_names_the_field(client: TestClient, auth: dict[str, str]) -> None:
    cases = {
        "recipe.weight": {"method": {"name": "rtn"}, "weight": {"bits": 5}},
        "recipe.calibration.num_samples": {"method": {"name": "rtn"}, "calibration": {"num_samples": 0}},
        "recipe.method.flatquant.epochs": {"method": {"name": "flatquant", "epochs": -1}},
        "recipe.method": {"method": {"name": "nope"}},
        "recipe.bogus": {"method": {"name": "rtn"}, "bogus": 1},
    }
    for field, recipe in cases.items():
        r = client.post("/v1/recipes/validate", json={"recipe": recipe}, headers=auth)
        assert r.status_code == 422, (field, r.text)
        err = r.json()["error"]
        assert err["code"] == "validation_error"
        fields = [d["field"] for d in err["details"]]
        assert any(f == field or f.startswith(field + ".") for f in fields), (field, fields)
        assert field.split(".")[1] in err["message"]
