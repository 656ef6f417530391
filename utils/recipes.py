"""YAML recipes: the option values a training run starts from, read safely, with errors that name the line."""

from __future__ import annotations

from pathlib import Path

import yaml


def read_recipe(path) -> dict:
    """{option: value} from a YAML recipe. Anything else is a ValueError naming the file and, where
    YAML knows it, the line: unreadable text, broken YAML, a top level that is not a mapping, or a
    tag such as !!python/object (a recipe holds plain values; it never constructs or runs anything)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"recipe {path} cannot be read: {error}") from None
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        if isinstance(error, yaml.constructor.ConstructorError):  # safe_load refuses !!python/... tags
            problem = problem.replace("tag:yaml.org,2002:", "!!")
            raise ValueError(f"recipe {path}{where}: {problem}: refused, a recipe holds plain values only") from None
        raise ValueError(f"recipe {path}{where}: not valid YAML: {problem}") from None
    if recipe is None:  # empty, or comments only
        return {}
    if not isinstance(recipe, dict):
        line = yaml.compose(text, Loader=yaml.SafeLoader).start_mark.line + 1
        raise ValueError(
            f"recipe {path}, line {line}: the top level is a {type(recipe).__name__}, not a mapping of 'option: value' lines"
        )
    not_names = [key for key in recipe if not isinstance(key, str)]
    if not_names:
        raise ValueError(f"recipe {path}: {not_names[0]!r} is not an option name")
    return recipe
