"""Declared settings: one validation rule per dataclass field, and one ``to_dict``/``from_dict``.

Every settings dataclass of oel_jax (the stages' configs and `oel_jax.config.RunConfig`, the
run's tree) declares each field once, with its default and its rule:

    @dataclasses.dataclass(frozen=True)
    class Example:
      steps: int = settings.integer(20, minimum=1)
      \"\"\"Optimizer steps.\"\"\"

      def __post_init__(self):
        settings.check(self)

`check` raises one ValueError listing every invalid field, each named by its path
(``Example.steps must be an integer >= 1, got 0``). Checks between fields are a method of the
dataclass that owns them, ``cross_checks(self, at)``, which returns messages; ``at(name)``
names a field by its path, and ``at.ok(*names)`` tells whether those fields passed their own
rules (a cross-check reads only valid values).

`from_dict` builds a dataclass tree from JSON-like data (an unknown key is an error naming
the key and the known fields) without the dataclasses' own checks, and `problems` then lists
every error of the tree at once, paths from the root (``config.extraction.num_runs must be an
integer >= 1, got 0``); `to_dict` is the inverse of `from_dict`, `load` both steps.

`SamplingParams` holds the settings every sampler call takes; its rules are the ones every
sampling field of every stage is declared with (`temperature`, `top_k`, `top_p`,
`max_new_tokens`), so they live here once.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

RULE = "oel_jax.rule"
"""The `dataclasses.Field.metadata` key holding a field's `Rule`."""

# Set while `from_dict` builds a tree: the dataclasses' own checks wait, so that the tree's
# errors are collected all at once under their full paths.
_DEFERRED = contextvars.ContextVar("oel_jax_settings_deferred", default=False)


@dataclasses.dataclass(frozen=True)
class Rule:
  """What values one field accepts."""

  kind: str
  """``"int"``, ``"number"``, ``"bool"``, ``"str"``, ``"choice"``, ``"seeds"``, ``"mapping"``
  or ``"section"`` (a nested settings dataclass)."""

  minimum: float | None = None
  """Lower bound of an ``int`` or ``number``."""

  exclusive: bool = False
  """The lower bound itself is not allowed (``> minimum``)."""

  maximum: float | None = None
  """Upper bound (inclusive) of a ``number``."""

  choices: tuple[Any, ...] = ()
  """The values a ``choice`` takes."""

  optional: bool = False
  """None is allowed too (an ``int`` that may be unset). In config files 0 also means None,
  since a config file cannot override None from the command line without a placeholder."""

  section: type | None = None
  """The dataclass of a ``section``."""

  def problem(self, value: Any) -> str | None:
    """What is wrong with ``value`` (a phrase after the field's path), or None."""
    if self.optional and value is None:
      return None
    return _PROBLEMS[self.kind](self, value)


def _is_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _int_problem(rule: Rule, value: Any) -> str | None:
  bound = f" >= {rule.minimum}" if rule.minimum is not None else ""
  if not _is_int(value) or (rule.minimum is not None and value < rule.minimum):
    return f"must be {'None or ' if rule.optional else ''}an integer{bound}, got {value!r}"
  return None


def _number_problem(rule: Rule, value: Any) -> str | None:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    return f"must be a number, got {value!r}"
  low, high = rule.minimum, rule.maximum
  # Written so that NaN fails every bound.
  ok_low = low is None or (value > low if rule.exclusive else value >= low)
  ok_high = high is None or value <= high
  if ok_low and ok_high and not math.isnan(value):
    return None
  if low is not None and high is not None:
    return f"must be in {'(' if rule.exclusive else '['}{low}, {high}], got {value!r}"
  if low is not None:
    return f"must be {'>' if rule.exclusive else '>='} {low}, got {value!r}"
  if high is not None:
    return f"must be <= {high}, got {value!r}"
  return "must be a number, not NaN"


def _seeds_problem(rule: Rule, value: Any) -> str | None:
  del rule
  seeds = tuple(value) if isinstance(value, (tuple, list)) else None
  if not seeds or any(not _is_int(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    return f"must be one or more distinct integers >= 0, got {value!r}"
  return None


_PROBLEMS: dict[str, Callable[[Rule, Any], str | None]] = {
    "int": _int_problem,
    "number": _number_problem,
    "bool": lambda r, v: None if isinstance(v, bool) else f"must be a bool, got {v!r}",
    "str": lambda r, v: None if isinstance(v, str) else f"must be a string, got {v!r}",
    "choice": lambda r, v: None if isinstance(v, str) and v in r.choices else
              f"must be one of {r.choices}, got {v!r}",
    "seeds": _seeds_problem,
    "mapping": lambda r, v: None if isinstance(v, Mapping) else
               f"must be a mapping, got {v!r}",
    "section": lambda r, v: None if isinstance(v, r.section) else
               f"must be a {r.section.__name__}, got {type(v).__name__}",
}


# ---------------------------------------------------------------------------------------------
# Declaring fields.


def _field(default: Any, rule: Rule) -> Any:
  return dataclasses.field(default=default, metadata={RULE: rule})


def integer(default: int | None, *, minimum: int | None = 0, optional: bool = False) -> Any:
  """An integer field, >= ``minimum``; ``optional``: None too."""
  return _field(default, Rule("int", minimum=minimum, optional=optional))


def number(default: float, *, minimum: float | None = None, exclusive: bool = False,
           maximum: float | None = None) -> Any:
  """A real-number field (ints accepted) within the bounds."""
  return _field(default, Rule("number", minimum=minimum, exclusive=exclusive, maximum=maximum))


def boolean(default: bool) -> Any:
  """A bool field (1 and 0 are refused: they are usually a typo for a count)."""
  return _field(default, Rule("bool"))


def text(default: str) -> Any:
  """A string field."""
  return _field(default, Rule("str"))


def choice(default: str, choices: Sequence[str]) -> Any:
  """A string field that takes one of ``choices``."""
  return _field(default, Rule("choice", choices=tuple(choices)))


def seeds(default: Sequence[int]) -> Any:
  """A non-empty tuple of distinct integers >= 0 (lists become tuples)."""
  return _field(tuple(default), Rule("seeds"))


def mapping() -> Any:
  """A free-form mapping of keyword settings (e.g. an environment's), empty by default."""
  return dataclasses.field(default_factory=dict, metadata={RULE: Rule("mapping")})


def section(cls: type, **values: Any) -> Any:
  """A nested settings dataclass: its own defaults, or those ``values`` change."""
  return dataclasses.field(default_factory=lambda: cls(**values),
                           metadata={RULE: Rule("section", section=cls)})


# The rules of every sampling setting, wherever a stage declares one.


def temperature(default: float) -> Any:
  """Sampling temperature, >= 0 (0 = greedy, the Sampler's public API)."""
  return number(default, minimum=0)


def top_k(default: int) -> Any:
  """Keep only the k most likely tokens; 0 = off."""
  return integer(default, minimum=0)


def top_p(default: float) -> Any:
  """Nucleus sampling mass in (0, 1]; 1 = off."""
  return number(default, minimum=0, exclusive=True, maximum=1)


def max_new_tokens(default: int | None, *, optional: bool = False) -> Any:
  """Token budget of one reply (reasoning included), >= 1."""
  return integer(default, minimum=1, optional=optional)


# ---------------------------------------------------------------------------------------------
# Checking.


@dataclasses.dataclass(frozen=True)
class At:
  """Names fields for messages and tells whether they are valid (see the module docstring)."""

  path: str
  """The path of the dataclass being checked (``"config.consolidation"``, ``"TrainConfig"``)."""

  errors: Sequence[str]
  """The errors found so far in the whole tree."""

  aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  """Full path -> the path it is set from (``config.consolidation.train`` ->
  ``config.train``): a field filled in from elsewhere in the tree is named where it is set."""

  def __call__(self, name: str) -> str:
    full = f"{self.path}.{name}"
    for alias, source in self.aliases.items():
      if full == alias or full.startswith(alias + "."):
        return source + full[len(alias):]
    return full

  def ok(self, *names: str) -> bool:
    """Whether none of these fields (or anything below them) has an error."""
    paths = [self(n) for n in names]
    return not any(e.startswith(p) and e[len(p):len(p) + 1] in (" ", ".", ":", "")
                   for e in self.errors for p in paths)


def _rule_problems(obj: Any, path: str, skip: Callable[[str], bool], errors: list[str]) -> None:
  for f in dataclasses.fields(obj):
    rule, where = f.metadata.get(RULE), f"{path}.{f.name}"
    if rule is None or skip(where):
      continue
    value = getattr(obj, f.name)
    message = rule.problem(value)
    if message:
      errors.append(f"{where} {message}")
    elif rule.kind == "section":
      _rule_problems(value, where, skip, errors)


def _cross_problems(obj: Any, at: At, skip: Callable[[str], bool], out: list[str]) -> None:
  for f in dataclasses.fields(obj):
    rule, where = f.metadata.get(RULE), f"{at.path}.{f.name}"
    # A section that is not a dataclass at all has its rule error; one with invalid fields
    # still runs its cross-checks, which skip those fields (`At.ok`).
    if rule is not None and rule.kind == "section" and not skip(where) and \
        dataclasses.is_dataclass(getattr(obj, f.name)):
      _cross_problems(getattr(obj, f.name), dataclasses.replace(at, path=where), skip, out)
  cross = getattr(obj, "cross_checks", None)
  if cross is not None:
    out.extend(cross(at))


def problems(obj: Any, path: str, *, skip: Callable[[str], bool] = lambda p: False,
             aliases: Mapping[str, str] | None = None) -> list[str]:
  """Every rule and cross-check error of ``obj`` and the dataclasses in it, named under
  ``path``; fields whose path ``skip`` accepts are not checked (their source is).

  Rules are checked first, everywhere, so that each cross-check knows which of the fields it
  reads are valid (`At.ok`), wherever in the tree they are.
  """
  errors: list[str] = []
  _rule_problems(obj, path, skip, errors)
  cross: list[str] = []
  _cross_problems(obj, At(path, tuple(errors), dict(aliases or {})), skip, cross)
  return errors + cross


def check(obj: Any) -> None:
  """Raises ValueError listing every error of ``obj`` (paths under its class name); a no-op
  while `from_dict` builds a tree (it checks the whole tree itself)."""
  if is_deferred():
    return
  found = problems(obj, type(obj).__name__)
  if found:
    raise ValueError("; ".join(found))


def is_deferred() -> bool:
  """Whether dataclasses built now skip their own `check` (inside `deferred`)."""
  return _DEFERRED.get()


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Dataclasses built inside skip their own `check` (the caller checks the tree)."""
  token = _DEFERRED.set(True)
  try:
    yield
  finally:
    _DEFERRED.reset(token)


# ---------------------------------------------------------------------------------------------
# Data <-> dataclasses.


def _plain(value: Any) -> Any:
  """JSON-like data of a value: tuples become lists, mappings dicts."""
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return to_dict(value)
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def _frozen(value: Any) -> Any:
  """Lists as tuples, mappings as dicts, recursively: a value that compares equal after a
  trip through JSON."""
  if isinstance(value, Mapping) or hasattr(value, "to_dict"):
    value = value.to_dict() if not isinstance(value, Mapping) else value
    return {str(k): _frozen(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return tuple(_frozen(v) for v in value)
  return value


def to_dict(obj: Any, *, omit: Callable[[str], bool] = lambda p: False, path: str = ""
            ) -> dict[str, Any]:
  """A settings dataclass as JSON-like data; fields whose dotted path (from ``obj``)
  ``omit`` accepts are left out."""
  out = {}
  for f in dataclasses.fields(obj):
    where = f"{path}{f.name}"
    if omit(where):
      continue
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      out[f.name] = to_dict(value, omit=omit, path=where + ".")
    else:
      out[f.name] = _plain(value)
  return out


def narrow(cls: type, obj: Any, **changes: Any) -> Any:
  """``cls`` holding the fields of ``obj`` it has (``obj``'s class extends ``cls``), with
  ``changes``."""
  values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if f.init}
  return cls(**{**values, **changes})


def to_config_dict(obj: Any, *, omit: Callable[[str], bool] = lambda p: False, path: str = ""
                   ) -> ml_collections.ConfigDict:
  """A settings dataclass as an ml_collections ConfigDict (what config files edit).

  Optional integers that are None become ``placeholder(int)``: None, yet typed, so that
  ``--config.<field>=5`` overrides them; mappings become (open) ConfigDicts.
  """
  out = ml_collections.ConfigDict()
  for f in dataclasses.fields(obj):
    where, rule = f"{path}{f.name}", f.metadata.get(RULE)
    if omit(where):
      continue
    value = getattr(obj, f.name)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
      out[f.name] = to_config_dict(value, omit=omit, path=where + ".")
    elif rule is not None and rule.kind == "mapping":
      out[f.name] = ml_collections.ConfigDict(dict(value))
    elif value is None and rule is not None and rule.kind == "int":
      out[f.name] = ml_collections.config_dict.placeholder(int)
    else:
      out[f.name] = value
  return out


def normalize(value: Any, rule: Rule | None, *, zero_is_none: bool) -> Any:
  """A field value from data as the dataclass holds it (tuples, dicts, None for 0)."""
  if rule is None:
    return value
  if rule.kind == "seeds" and isinstance(value, (list, tuple)):
    return tuple(value)
  if rule.kind == "mapping" and (isinstance(value, Mapping) or hasattr(value, "to_dict")):
    return _frozen(value)
  if rule.optional and zero_is_none and _is_int(value) and value == 0:
    return None
  return value


def from_dict(cls: type, data: Any, *, path: str, errors: list[str],
              refuse: Mapping[str, str] | None = None, zero_is_none: bool = False) -> Any:
  """Builds ``cls`` from JSON-like data without checking rules; appends structure errors.

  Args:
    cls: the settings dataclass.
    data: a mapping (or an ml_collections ConfigDict) of its fields; missing ones take their
      defaults.
    path: the path of ``data`` in messages (``"config"``).
    errors: where an unknown key, a refused key or a section that is not a mapping is
      reported.
    refuse: full path -> why a key that the dataclass has is not settable here.
    zero_is_none: 0 in an optional integer field means None (the config files' convention).

  Returns:
    The dataclass (built inside `deferred`: check it with `problems`).
  """
  refuse = refuse or {}
  if hasattr(data, "to_dict") and not isinstance(data, Mapping):
    data = data.to_dict()
  if not isinstance(data, Mapping):
    errors.append(f"{path} must be a mapping of fields, got {type(data).__name__}")
    data = {}
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  values: dict[str, Any] = {}
  for key, value in data.items():
    where = f"{path}.{key}"
    if key not in fields:
      errors.append(f"{where}: unknown field; {cls.__name__} has no field {key!r} (fields: "
                    f"{', '.join(sorted(n for n in fields if f'{path}.{n}' not in refuse))})")
      continue
    if where in refuse:
      errors.append(f"{where}: {refuse[where]}")
      continue
    rule = fields[key].metadata.get(RULE)
    if rule is not None and rule.kind == "section":
      values[key] = from_dict(rule.section, value, path=where, errors=errors, refuse=refuse,
                              zero_is_none=zero_is_none)
    else:
      values[key] = normalize(value, rule, zero_is_none=zero_is_none)
  with deferred():
    return cls(**values)


def load(cls: type, data: Any, *, path: str | None = None) -> Any:
  """``cls`` from `to_dict` data; raises ValueError listing every problem."""
  path = path or cls.__name__
  errors: list[str] = []
  obj = from_dict(cls, data, path=path, errors=errors)
  errors.extend(problems(obj, path))
  if errors:
    raise ValueError("; ".join(errors))
  return obj


# ---------------------------------------------------------------------------------------------
# Sampling.


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """The settings of one sampler call: the same rules wherever a stage samples.

  Temperature 0 is allowed everywhere (greedy decoding, part of `oel_jax.sampling.Sampler`'s
  public API). Consolidation, whose loss divides logits by the temperature, needs more: its
  temperature must equal ``train.temperature``, which is > 0 (`TrainConfig`); that is the
  loss's rule, checked by `oel_jax.consolidate.ConsolidationConfig`, not a sampling rule.
  """

  temperature: float = temperature(0.7)
  """Sampling temperature; 0 = greedy."""

  top_k: int = top_k(0)
  """Keep only the k most likely tokens; 0 = off."""

  top_p: float = top_p(1.0)
  """Nucleus sampling mass in (0, 1]; 1 = off."""

  max_new_tokens: int = max_new_tokens(1024)
  """Token budget of one reply, reasoning included."""

  enable_thinking: bool = boolean(True)
  """Render prompts with the chat template's thinking mode on (templates without the flag
  ignore it)."""

  def __post_init__(self):
    check(self)

  @classmethod
  def of(cls, section: Any, max_new_tokens: int | None = None) -> SamplingParams:
    """The sampling settings of a stage's section, which holds the five fields by these names
    (``max_new_tokens`` given: that budget instead of the section's)."""
    return cls(temperature=section.temperature, top_k=section.top_k, top_p=section.top_p,
               max_new_tokens=section.max_new_tokens if max_new_tokens is None
               else max_new_tokens,
               enable_thinking=section.enable_thinking)

  def generate_kwargs(self) -> dict[str, Any]:
    """The keywords of `oel_jax.sampling.Sampler.generate` these settings fill."""
    return {"max_new_tokens": int(self.max_new_tokens), "temperature": float(self.temperature),
            "top_k": int(self.top_k), "top_p": float(self.top_p)}
