"""The configuration reference (docs/configuration.md): one row per environment variable of the
settings models of topics/settings.py, with its type, constraints, default and description."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from compose.reference.common import ROOT, ReferenceProblem, table
from topics.settings import Settings


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable the settings read."""

    section: str  # the settings field it is nested under ("" for top-level fields)
    name: str
    type: str
    default: str
    description: str


def variables(settings: type[BaseSettings] = Settings) -> list[Variable]:
    """Every variable, in declaration order, named as pydantic-settings reads them (the names
    `Settings.env_names()` lists). Fails on a field without a description."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    nested = str(settings.model_config.get("env_nested_delimiter", "__"))
    found: list[Variable] = []
    for name, field in settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            found += [_variable(name, f"{prefix}{name}{nested}{sub}".upper(), subfield)
                      for sub, subfield in section.model_fields.items()]
        else:
            found.append(_variable("", f"{prefix}{name}".upper(), field))
    undocumented = [v.name for v in found if not v.description]
    if undocumented:
        raise ReferenceProblem("settings without a description (add Field(description=...) "
                               f"in topics/settings.py): {', '.join(undocumented)}")
    return found


def _variable(section: str, name: str, field: FieldInfo) -> Variable:
    return Variable(section, name, _type_name(field), _default_text(field),
                    " ".join((field.description or "").split()))


def _type_name(field: FieldInfo) -> str:
    """The Python type, with the field's bounds: what a value must be to be accepted."""
    annotation = field.annotation
    name = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    bounds = [text for constraint in field.metadata for text in _bound(constraint)]
    return f"`{name.replace('typing.', '')}`" + (f" {', '.join(bounds)}" if bounds else "")


_BOUNDS = ((Ge, "ge", "≥"), (Gt, "gt", ">"), (Le, "le", "≤"), (Lt, "lt", "<"))


def _bound(constraint: object) -> Iterator[str]:
    for kind, attribute, sign in _BOUNDS:
        if isinstance(constraint, kind):
            yield f"{sign} {getattr(constraint, attribute)}"


def _default_text(field: FieldInfo) -> str:
    """The default as a reader would write it in the environment. A secret is never shown
    (only whether it is empty), and a path inside the repository is shown relative to it:
    the table must not depend on the machine that printed it."""
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "`**********` (secret)" if str(value) else "empty (secret)"
    if isinstance(value, Path):
        return f"`{_repo_relative(value)}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, dict | list):
        return f"`{orjson.dumps(value).decode()}`"
    return f"`{value}`" if str(value) else "empty"


def _repo_relative(path: Path) -> str:
    """Relative to the checkout that printed it, so every checkout prints the same table."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix() if not path.is_absolute() else path.name


def configuration_markdown(settings: type[BaseSettings] = Settings) -> str:
    """One table per settings section, top-level variables last, in declaration order."""
    rows = variables(settings)
    sections = [*dict.fromkeys(v.section for v in rows if v.section), ""]
    out: list[str] = []
    for section in sections:
        members = [v for v in rows if v.section == section]
        if members:
            prefix = str(settings.model_config.get("env_prefix", ""))
            out += [_section_heading(settings, section, prefix), ""]
            out += table(("variable", "type", "default", "description"),
                          [(f"`{v.name}`", v.type, v.default, v.description) for v in members])
            out.append("")
    return "\n".join(out[:-1]) + "\n"


def _section_heading(settings: type[BaseSettings], section: str, prefix: str) -> str:
    """The section's variable prefix as a heading, its model's docstring under it."""
    if not section:
        return "### Top-level settings"
    model = settings.model_fields[section].annotation
    summary = " ".join((getattr(model, "__doc__", None) or "").split("\n\n")[0].split())
    return f"### `{prefix}{section.upper()}__…`" + (f"\n\n{summary}" if summary else "")
