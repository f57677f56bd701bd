"""The one YAML-to-model loader of every configuration (run, site, coordinator, student training).

One pass: pydantic validates the whole file with the config file's folder in its validation context, so
file paths are resolved and checked by their own field validators; then every cross-section rule whose
inputs are valid runs, whatever else is wrong; every problem is listed, in words a person reads, in one
``ConfigError``. Relative paths always resolve against the folder of the config file that names them.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar, Union, get_args, get_origin

import structlog
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.fields import FieldInfo

from privdistill.errors import ConfigError

log = structlog.get_logger(__name__)

CONTEXT_KEY = "privdistill.config"
_MISSING: Any = object()


@dataclass(frozen=True)
class CrossCheck:
    """A rule over values from several places of one config (dotted paths in ``needs``, passed to ``run`` in
    that order). It runs whenever those values are valid, even when other parts of the file are not.
    With ``strict_when`` (the dotted path of a bool, e.g. ``site.production``), its problems are only
    warnings when that value is false."""

    needs: tuple[str, ...]
    run: Callable[..., list[str]]
    strict_when: str | None = None


class Strict(BaseModel):
    """Base of every configuration model: unknown keys are refused, a validated config cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # keys that were renamed or removed -> what to write instead (reported in place of "unknown key")
    renamed: ClassVar[Mapping[str, str]] = {}
    # rules between this model's own fields (needs: field names). The loader runs them, wherever the model
    # sits in the file, even when other fields of it are wrong; a model built in code runs them when built
    rules: ClassVar[tuple[CrossCheck, ...]] = ()
    # rules across sections of a whole file (needs: dotted paths from the root), run by the loader only
    checks: ClassVar[tuple[CrossCheck, ...]] = ()

    @model_validator(mode="after")
    def _own_rules(self, info: ValidationInfo) -> Self:
        ctx = load_context(info)
        if ctx is None or type(self) not in ctx.deferred:  # else the loader runs them (_rules)
            problems = [p for rule in self.rules for p in rule.run(*(getattr(self, n) for n in rule.needs))]
            if problems:
                raise ValueError("; ".join(problems))
        return self


# --------------------------------------------------------------------------- paths
@dataclass
class LoadContext:
    """What a validation started by the loader carries: the folder relative paths start from, and the
    warnings found so far (problems a test site may have, e.g. ``site.production: false``)."""

    base_dir: Path | None
    warnings: list[str] = field(default_factory=list)
    # models whose rules the loader runs itself, with every other check (the rest run them when validated)
    deferred: frozenset[type] = frozenset()


def load_context(info: ValidationInfo) -> LoadContext | None:
    """The loader's context in a field validator; None when a model is built directly (nothing is checked)."""
    ctx = info.context
    found = ctx.get(CONTEXT_KEY) if isinstance(ctx, dict) else None
    return found if isinstance(found, LoadContext) else None


def resolve_path(path: Path, base_dir: Path | None) -> Path:
    """``path`` relative to ``base_dir`` (the config file's folder); an absolute path is kept as it is."""
    return path if path.is_absolute() or base_dir is None else base_dir / path


def resolved(path: Path, info: ValidationInfo) -> Path:
    """Field validator: the path resolved against the config file's folder (when the loader validates)."""
    ctx = load_context(info)
    return path if ctx is None else resolve_path(path, ctx.base_dir)


def _exists(path: Path, info: ValidationInfo) -> Path:
    full = resolved(path, info)
    if load_context(info) is not None and not full.exists():
        raise ValueError(f"path does not exist: {full}")
    return full


def _is_file(path: Path, info: ValidationInfo) -> Path:
    full = resolved(path, info)
    if load_context(info) is not None and not full.is_file():
        raise ValueError(f"file not found: {full}")
    return full


def _is_dir(path: Path, info: ValidationInfo) -> Path:
    full = resolved(path, info)
    if load_context(info) is not None and not full.is_dir():
        raise ValueError(f"not a directory: {full}")
    return full


# a path relative to the config file's folder; ExistingPath/File/Dir must also be there when the file is loaded
def _distinct(v: list[int]) -> list[int]:
    if len(set(v)) != len(v):
        raise ValueError("duplicate class values")
    return v


ClassList = Annotated[list[int], AfterValidator(_distinct)]  # label values, each at most once
ConfigPath = Annotated[Path, AfterValidator(resolved)]
ExistingPath = Annotated[Path, AfterValidator(_exists)]
ExistingFile = Annotated[Path, AfterValidator(_is_file)]
ExistingDir = Annotated[Path, AfterValidator(_is_dir)]


# --------------------------------------------------------------------------- reading the model's types
def _unwrap(tp: Any) -> Any:
    """``tp`` without Annotated metadata and without ``| None``."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif _is_union(tp) and type(None) in get_args(tp) and len(get_args(tp)) == 2:
            tp = next(a for a in get_args(tp) if a is not type(None))
        else:
            return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _tagged_member(tp: Any, part: Any) -> Any:
    """The member of a discriminated union whose ``Literal`` tag is ``part``, else None."""
    if not _is_union(tp) or not isinstance(part, str):
        return None
    for member in map(_unwrap, get_args(tp)):
        if _is_model(member) and any(get_origin(f.annotation) is Literal and part in get_args(f.annotation)
                                     for f in member.model_fields.values()):
            return member
    return None


@dataclass
class _Place:
    shown: str  # the dotted path a person writes in the YAML file (union tags dropped)
    parent: Any  # the type holding the last key
    field: FieldInfo | None  # the last key's field, when it is one
    type: Any  # the last key's type


def _place(model: type[BaseModel], loc: tuple[int | str, ...]) -> _Place:
    shown, info = "", None
    parent: Any = None
    tp: Any = model
    for part in loc:
        if isinstance(part, str) and part.startswith("function-"):
            continue
        base = _unwrap(tp)
        member = _tagged_member(base, part)
        if member is not None:
            tp = member
            continue
        parent, info, tp = base, None, None
        args = get_args(base)
        if _is_model(base) and isinstance(part, str) and part in base.model_fields:
            info = base.model_fields[part]
            tp = info.annotation
        elif isinstance(part, int) and get_origin(base) in (list, tuple, set) and args:
            tp = args[0]
        elif get_origin(base) is dict and len(args) == 2:
            tp = args[1]
        shown += f"[{part}]" if isinstance(part, int) else (f".{part}" if shown else str(part))
    return _Place(shown or "<root>", parent, info, tp)


# --------------------------------------------------------------------------- messages
def _got(value: Any) -> str:
    text = repr(value)
    return f" (got {text if len(text) <= 60 else text[:57] + '...'})"


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "text", bool: "true/false", int: "a number", float: "a number",
             type(None): "nothing (null)"}
    return names.get(type(value), type(value).__name__)


def _did_you_mean(word: Any, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _message(e: Mapping[str, Any], place: _Place) -> str:
    kind, ctx, value = e["type"], e.get("ctx") or {}, e.get("input")
    scalar = isinstance(value, str | int | float | bool) or value is None
    got = _got(value) if scalar else f" (got {_kind(value)})"
    if kind == "extra_forbidden":
        key = e["loc"][-1]
        fields = list(place.parent.model_fields) if _is_model(place.parent) else []
        hint = getattr(place.parent, "renamed", {}).get(key) if _is_model(place.parent) else None
        if hint:
            return hint
        return "unknown key" + (_did_you_mean(key, fields) or (f"; valid keys here: {', '.join(fields)}" if fields else ""))
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return "required key missing"
    if kind == "string_pattern_mismatch":
        says = place.field.description if place.field is not None else None
        return (f"use {says}" if says else f"must match the pattern {ctx.get('pattern')}") + got
    if kind == "literal_error":
        choices = [str(c) for c in get_args(_unwrap(place.type))] if get_origin(_unwrap(place.type)) is Literal else []
        return f"must be {ctx.get('expected')}{got}" + (_did_you_mean(value, choices) if isinstance(value, str) else "")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = _tags(place.type, ctx.get("discriminator"))
        if kind == "union_tag_not_found":
            return f"required key missing: which kind this is, one of {', '.join(map(repr, tags))}"
        return f"must be one of {ctx.get('expected_tags')}{_got(ctx.get('tag'))}" + _did_you_mean(ctx.get("tag"), tags)
    bounds = {"greater_than": "must be greater than {gt}", "greater_than_equal": "must be at least {ge}",
              "less_than": "must be less than {lt}", "less_than_equal": "must be at most {le}",
              "too_short": "needs at least {min_length} entries", "too_long": "takes at most {max_length} entries",
              "string_too_short": "needs at least {min_length} characters",
              "string_too_long": "takes at most {max_length} characters"}
    if kind in bounds:
        return bounds[kind].format(**ctx) + (got if kind not in ("too_short", "too_long") else "")
    want = {"int_parsing": "a whole number", "int_type": "a whole number", "int_from_float": "a whole number",
            "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
            "bool_type": "true or false", "string_type": "text", "list_type": "a list", "path_type": "a path",
            "dict_type": "a mapping of keys", "model_type": "a mapping of keys",
            "model_attributes_type": "a mapping of keys"}.get(kind)
    if want is not None:
        return f"must be {want}{got}"
    return str(e["msg"])


def _tags(tp: Any, key: Any) -> list[str]:
    """The tags of a discriminated union of models: the values of their Literal field ``key``."""
    tp, key = _unwrap(tp), str(key).strip("'")
    members = [_unwrap(m) for m in get_args(tp)] if _is_union(tp) else []
    fields = [m.model_fields[key] for m in members if _is_model(m) and key in m.model_fields]
    return [str(v) for f in fields if get_origin(f.annotation) is Literal for v in get_args(f.annotation)]


def format_errors(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """Each of pydantic's errors as ``where: what to do``, with the path a person writes in the YAML file."""
    problems = []
    for e in err.errors():
        place = _place(model, e["loc"])
        where = place.shown
        if e["type"] in ("union_tag_invalid", "union_tag_not_found"):  # the problem is the tag key itself
            where += "." + str((e.get("ctx") or {}).get("discriminator", "")).strip("'")
        problems.append(f"{where}: {_message(e, place)}")
    return problems


# --------------------------------------------------------------------------- cross-section rules
def _value_at(model: type[BaseModel], raw: Any, dotted: str, context: dict[str, Any]) -> Any:
    """The validated value at ``dotted`` of the unvalidated mapping ``raw`` (its default when absent), or
    _MISSING when it (or a section on the way) is invalid or absent without a default."""
    tp: Any = model
    value: Any = raw
    info: FieldInfo | None = None
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        base = _unwrap(tp)
        if not _is_model(base) or part not in base.model_fields or not isinstance(value, dict):
            return _MISSING
        info = base.model_fields[part]
        if part not in value:  # absent: the default, then plain attributes of it
            if info.is_required():
                return _MISSING
            value = info.get_default(call_default_factory=True)
            for rest in parts[i + 1:]:
                value = getattr(value, rest, _MISSING)
            return value
        value, tp = value[part], info.annotation
    if info is None:
        return _MISSING
    annotated: Any = Annotated[info.annotation, info]  # the field's type with its constraints
    try:
        return TypeAdapter(annotated).validate_python(value, context=context)
    except ValidationError:
        return _MISSING


def _rules(model: type[BaseModel], prefix: str = "", depth: int = 0) -> Iterator[tuple[type, str, CrossCheck]]:
    """(model, where, rule with dotted needs) for the rules of ``model`` and of every model section below it
    (through plain and optional fields; a model inside a list or a union runs its rules when validated)."""
    for rule in model.rules if issubclass(model, Strict) else ():
        yield model, prefix, CrossCheck(tuple(prefix + n for n in rule.needs), rule.run)
    for name, info in model.model_fields.items():
        sub = _unwrap(info.annotation)
        if _is_model(sub) and depth < 8:
            yield from _rules(sub, f"{prefix}{name}.", depth + 1)


def _off_path(tp: Any, on_path: bool = True, depth: int = 0) -> set[type]:
    """The model classes in ``tp`` that sit where no dotted path reaches (inside a list, dict or union)."""
    tp = _unwrap(tp)
    found: set[type] = set()
    if depth > 8:
        return found
    if _is_model(tp):
        if not on_path:
            found.add(tp)
        for info in tp.model_fields.values():
            found |= _off_path(info.annotation, on_path, depth + 1)
    else:
        for arg in get_args(tp):
            found |= _off_path(arg, False, depth + 1)
    return found


def _attribute_at(cfg: BaseModel, dotted: str) -> Any:
    value: Any = cfg
    for part in dotted.split("."):
        value = getattr(value, part, _MISSING)
    return value


# --------------------------------------------------------------------------- the loader
M = TypeVar("M", bound=BaseModel)


def parse_model(model: type[M], raw: Any, *, source: str | None = None, base_dir: Path | None = None) -> M:
    """Validate the parsed YAML ``raw`` into ``model`` in one pass; relative paths resolve against ``base_dir``.
    Raises ConfigError listing every problem; logs the warnings of a valid config."""
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: the configuration must be a YAML mapping of keys ({', '.join(model.model_fields)}),"
                           f" not {_kind(raw)}"], source)
    rules = list(_rules(model))
    # a class that also sits in a list or union keeps running its rules in pydantic (there is no path to it)
    load = LoadContext(base_dir, deferred=frozenset({owner for owner, _, _ in rules} - _off_path(model)))
    cfg: M | None = None
    problems: list[str] = []
    try:
        cfg = model.model_validate(raw, context={CONTEXT_KEY: load})
    except ValidationError as err:
        problems = format_errors(err, model)

    def value(dotted: str) -> Any:
        if cfg is not None:
            return _attribute_at(cfg, dotted)
        return _value_at(model, raw, dotted, {CONTEXT_KEY: LoadContext(base_dir, deferred=load.deferred)})

    every = [(where, rule) for _, where, rule in rules] + [("", check) for check in getattr(model, "checks", ())]
    for where, check in every:
        values = [value(need) for need in check.needs]
        if any(v is _MISSING for v in values):
            continue
        found = [f"{where[:-1]}: {p}" if where else p for p in check.run(*values)]
        strict = check.strict_when is None or value(check.strict_when) is not False
        (problems if strict else load.warnings).extend(found)
    if problems or cfg is None:
        raise ConfigError(list(dict.fromkeys(problems)), source)  # a rule run by both pydantic and the loader
    for warning in load.warnings:
        log.warning("config.unsafe_for_production", problem=warning, source=source)
    return cfg


def read_yaml(path: str | Path, *, missing_hint: str = "") -> Any:
    """A config file's parsed YAML; a missing file or a syntax error is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}{missing_hint}"], str(path))
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError([f"YAML syntax error: {err}"], str(path)) from None


def load_model(model: type[M], path: str | Path, *, missing_hint: str = "") -> M:
    """Read and validate a YAML config file; its relative paths resolve against the file's folder."""
    path = Path(path)
    return parse_model(model, read_yaml(path, missing_hint=missing_hint), source=str(path),
                       base_dir=path.resolve().parent)
