"""/v1/recipes: presets, the caller's saved recipes, and validation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from quant.recipes.presets import get_preset, list_presets
from quant.recipes.schema import Recipe
from service.api.deps import ApiKeyDep, SessionDep
from service.api.schemas import RecipeCreate, RecipeList, RecipeOut, RecipeValidateIn, RecipeValidateOut
from service.db.models import UserRecipe
from service.errors import ERROR_RESPONSES, ApiError, FieldError, validation_error

router = APIRouter(prefix="/v1/recipes", tags=["recipes"], responses=ERROR_RESPONSES)


def parse_recipe(data: dict[str, Any], field: str = "recipe") -> Recipe:
    """Validate a recipe object; 422 naming the offending field (``recipe.weight.bits``)."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, prefix=field) from None


def resolve_named_recipe(session: Session, api_key_id: int, name: str, field: str = "preset") -> Recipe:
    """A preset, else one of the caller's saved recipes; 422 naming ``field`` if neither exists."""
    try:
        return get_preset(name)
    except KeyError:
        pass
    row = session.scalar(select(UserRecipe).where(UserRecipe.api_key_id == api_key_id, UserRecipe.name == name))
    if row is None:
        raise ApiError(422, f"unknown preset or saved recipe {name!r}",
                       details=[FieldError(field=field, message=f"unknown recipe {name!r}", type="value_error")])
    return Recipe.model_validate(row.body)


@router.get("", response_model=RecipeList, summary="Presets plus your saved recipes")
def list_recipes(key: ApiKeyDep, session: SessionDep) -> RecipeList:
    items = [RecipeOut(name=n, source="preset", recipe=get_preset(n).to_dict()) for n in list_presets()]
    rows = session.scalars(select(UserRecipe).where(UserRecipe.api_key_id == key.id).order_by(UserRecipe.name))
    items += [RecipeOut(name=r.name, source="user", recipe=r.body) for r in rows]
    return RecipeList(items=items)


@router.post("", response_model=RecipeOut, status_code=201, summary="Save a named recipe")
def create_recipe(body: RecipeCreate, key: ApiKeyDep, session: SessionDep) -> RecipeOut:
    if body.name in set(list_presets()):
        raise ApiError(409, f"{body.name!r} is a preset name")
    recipe = parse_recipe(body.recipe)
    session.add(UserRecipe(api_key_id=key.id, name=body.name, body=recipe.to_dict()))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ApiError(409, f"you already have a recipe named {body.name!r}") from None
    return RecipeOut(name=body.name, source="user", recipe=recipe.to_dict())


@router.post("/validate", response_model=RecipeValidateOut, summary="Validate a recipe (422 names the bad field)")
def validate_recipe(body: RecipeValidateIn, key: ApiKeyDep) -> RecipeValidateOut:
    recipe = parse_recipe(body.recipe)
    return RecipeValidateOut(recipe=recipe.to_dict(), bits_label=recipe.bits_label)
