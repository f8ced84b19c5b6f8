"""A sweep's search space: which settings vary and how, checked against the training settings before
any trial starts. Pure: no Ray, no services; ``to_tune`` alone imports Ray Tune.

The space is a YAML mapping (a file, or the same text inline), one entry per setting, keyed by its
dotted path in ``pipeline.config.Settings`` (``train.lr``; ``-`` or ``_`` alike)::

    train.lr: {loguniform: [3.0e-4, 3.0e-3]}   # a range: loguniform, uniform, randint (upper bound excluded)
    train.ema_decay: [0.999, 0.9995]            # a list: one of these, sampled (= {choice: [...]})
    diffusion.objective: {grid: [eps, v]}       # every value, each with every other grid value
    train.loss_weighting: min_snr               # a constant: every trial

Every value a trial can take is validated by building the trial's settings from the base settings
(the job's flags) with that value: each choice and grid value, both bounds of a range (randint: the
largest integer it draws), and each combination of the choice and grid values. The errors name the
setting, the value and pydantic's reason. Settings that are not the model's or training's to vary
(where the run is stored or tracked, the cluster, the per-trial budget, the validation signal the
trials are stopped on) are refused by name.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.config import ConfigError, Settings

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
RANGES = ("uniform", "loguniform", "randint")
# The space is validated combination by combination when the choices and grids multiply to no more.
MAX_COMBINATIONS = 4096

# Settings no sweep may vary, and why. A section name covers all its fields.
NOT_SWEEPABLE = {
    "storage": "where checkpoints are stored, not what is trained",
    "tracking": "where results are tracked, not what is trained",
    "cluster": "the cluster and worker group, not what is trained (set it for all trials with the job's flags)",
    "sample": "the training grids' sampler; the evaluation's sampler is --sweep.eval-*",
    "train.run_name": "the sweep names each trial's run (<sweep>-t<index>)",
    "train.resume": "the sweep resumes trials itself",
    "train.total_images": "the per-trial budget, one for all trials (ASHA's maximum)",
    "train.validate_every_images": "the stopping signal must be measured alike in every trial",
    "train.validate_images": "the stopping signal must be measured alike in every trial",
    "train.register_as": "trials register no model",
    "train.progress_every_s": "does not change what is trained",
    "train.log_every_steps": "does not change what is trained",
    "train.grid_size": "does not change what is trained",
    "train.sample_every_images": "does not change what is trained",
    "train.keep_checkpoints": "does not change what is trained",
    "data.url": "the dataset is the sweep's: the metric compares every trial with it",
    "data.image_size": "the dataset is the sweep's: the metric compares every trial with it",
    "data.channels": "the dataset is the sweep's: the metric compares every trial with it",
    "data.strict": "does not change what is trained",
    "data.loader_workers": "does not change what is trained",
}


@dataclass(frozen=True)
class Param:
    """One setting of the space: ``kind`` is "constant", a sampling kind, or "grid"; ``values`` holds
    the validated values (constant: one; choice/grid: each; ranges: the two bounds)."""

    path: str
    kind: str
    values: tuple

    def spec(self) -> Any:
        """The YAML/JSON form, with the validated values."""
        if self.kind == "constant":
            return self.values[0]
        return {self.kind: list(self.values)}

    def describe(self) -> str:
        if self.kind == "constant":
            return f"{self.values[0]!r} (every trial)"
        if self.kind in RANGES:
            hi = f"{self.values[1]!r} excluded" if self.kind == "randint" else repr(self.values[1])
            return f"{self.kind} from {self.values[0]!r} to {hi}"
        return f"{self.kind} of {', '.join(repr(v) for v in self.values)}"


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    def to_json(self) -> dict[str, Any]:
        return {p.path: p.spec() for p in self.params}

    def grid_size(self) -> int:
        """Trials per sample: the product of the grid sizes (Tune repeats each grid point num_samples times)."""
        return math.prod(len(p.values) for p in self.params if p.kind == "grid")

    def describe(self) -> str:
        width = max((len(p.path) for p in self.params), default=0)
        return "\n".join(f"  {p.path:<{width}}  {p.describe()}" for p in self.params)


# ------------------------------------------------------------------------------------------------
# Loading


def read_space_text(spec: str) -> tuple[str, str]:
    """(YAML text, where it came from) of ``--sweep.space``: a file's path, or the YAML itself."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            return path.read_text(), str(path)
        except OSError as e:
            raise _error(f"cannot read the space file {spec!r}: {e}") from None
    if "\n" in spec or ":" in spec:
        return spec, ""
    raise _error(f"no space file {spec!r} (give a YAML file's path, or the YAML mapping itself)")


def load_space(spec: str, base: Settings) -> Space:
    """The space of ``--sweep.space`` (a YAML file or inline YAML), validated against ``base``."""
    text, where = read_space_text(spec)
    return parse_space(text, base, where=where)


def parse_space(text: str, base: Settings, *, where: str = "") -> Space:
    """The space in YAML ``text`` (``where``: the file it came from, for the errors), validated against ``base``."""
    import yaml

    at = f"{where}: " if where else ""

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _error(f"{at}not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise _error(f"{at}must be a mapping of setting -> value(s), e.g. 'train.lr: {{loguniform: [1e-4, 1e-3]}}'")
    params: list[Param] = []
    seen: dict[str, str] = {}
    for key, value in raw.items():
        path = normalize_path(str(key))
        if path in seen:
            raise _error(f"{at}{seen[path]!r} and {key!r} name the same setting {path}")
        seen[path] = str(key)
        params.append(_param(path, value, base))
    space = Space(tuple(params))
    _check_combinations(space, base)
    return space


def normalize_path(key: str) -> str:
    return key.strip().replace("-", "_")


def sweepable_paths(settings_cls: type[Settings] = Settings) -> list[str]:
    """Every ``section.field`` a space may name."""
    out = []
    for section, info in settings_cls.model_fields.items():
        model = info.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or section in NOT_SWEEPABLE:
            continue
        out += [f"{section}.{name}" for name in model.model_fields if f"{section}.{name}" not in NOT_SWEEPABLE]
    return out


def check_path(path: str) -> None:
    """ConfigError naming ``path`` when a space may not name it, with the close matches."""
    allowed = sweepable_paths()
    if path in allowed:
        return
    section = path.split(".", 1)[0]
    if path in NOT_SWEEPABLE or section in NOT_SWEEPABLE:
        why = NOT_SWEEPABLE.get(path) or NOT_SWEEPABLE[section]
        raise _error(f"{path}: not a setting a sweep varies ({why})")
    close = difflib.get_close_matches(path, allowed, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; settings a sweep can vary: {', '.join(allowed)}"
    raise _error(f"{path}: unknown setting{hint}")


def _param(path: str, value: Any, base: Settings) -> Param:
    check_path(path)
    if isinstance(value, dict):
        if len(value) != 1 or next(iter(value)) not in KINDS:
            raise _error(
                f"{path}: a mapping must have exactly one key, one of {', '.join(KINDS)} (got {sorted(map(str, value))})"
            )
        kind, arg = next(iter(value.items()))
    elif isinstance(value, list):
        kind, arg = "choice", value
    else:
        kind, arg = "constant", [value]
    if not isinstance(arg, list) or not arg:
        raise _error(f"{path}: {kind} takes a non-empty list (got {arg!r})")
    if kind in RANGES:
        return Param(path, kind, _range(path, kind, arg, base))
    return Param(path, kind, tuple(validated_value(base, path, v) for v in arg))


def _range(path: str, kind: str, arg: list, base: Settings) -> tuple:
    if len(arg) != 2:
        raise _error(f"{path}: {kind} takes [low, high] (got {arg!r})")
    numbers = []
    for v in arg:
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            numbers.append(int(v) if kind == "randint" else float(v))
        except (TypeError, ValueError):
            raise _error(f"{path}: {kind} bounds must be numbers (got {v!r})") from None
        if kind == "randint" and isinstance(v, float) and not float(v).is_integer():
            raise _error(f"{path}: randint bounds must be integers (got {v!r})")
    lo, hi = numbers
    if not lo < hi:
        raise _error(f"{path}: {kind} needs low < high (got {arg!r})")
    if kind == "loguniform" and lo <= 0:
        raise _error(f"{path}: loguniform needs low > 0 (got {arg!r})")
    # randint draws lo..hi-1
    held = [validated_value(base, path, v) for v in ((lo, hi - 1) if kind == "randint" else (lo, hi))]
    if kind != "randint" and isinstance(held[0], int) and not isinstance(held[0], bool):
        raise _error(f"{path} holds integers: {kind} draws fractions; use {{randint: [low, high + 1]}}")
    return lo, hi


def validated_value(base: Settings, path: str, value: Any) -> Any:
    """``value`` as the setting at ``path`` holds it (pydantic's conversion), once the whole trial
    settings validate with it; ConfigError naming the path, the value and the reason otherwise."""
    s = with_values(base, {path: value})
    section, field = path.split(".", 1)
    got = getattr(getattr(s, section), field)
    return list(got) if isinstance(got, tuple) else got


def with_values(base: Settings, values: dict[str, Any]) -> Settings:
    data = base.model_dump(mode="python")
    for path, value in values.items():
        section, field = path.split(".", 1)
        data[section][field] = value
    try:
        return type(base).model_validate(data)
    except ValidationError as e:
        shown = ", ".join(f"{p}={v!r}" for p, v in values.items())
        reasons = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'settings'}: {err['msg'].removeprefix('Value error, ')}"
            for err in e.errors()
        )
        raise _error(f"{shown}: invalid for a trial: {reasons}") from None


def _discrete_combinations(space: Space) -> Iterator[dict[str, Any]]:
    discrete = [p for p in space.params if p.kind in ("constant", "choice", "grid")]
    for combo in itertools.product(*(p.values for p in discrete)):
        yield {p.path: v for p, v in zip(discrete, combo, strict=True)}


def _check_combinations(space: Space, base: Settings) -> None:
    """Each combination of the constant, choice and grid values (ranges at the base settings)."""
    n = math.prod(len(p.values) for p in space.params if p.kind in ("constant", "choice", "grid"))
    if n <= MAX_COMBINATIONS:
        for values in _discrete_combinations(space):
            with_values(base, values)


def _error(message: str) -> ConfigError:
    return ConfigError(f"invalid configuration:\n  sweep.space: {message}")


# ------------------------------------------------------------------------------------------------
# Ray Tune


def to_tune(space: Space) -> dict[str, Any]:
    """Tune's ``param_space``: path -> a constant or Tune's sampling object. Paths stay flat keys."""
    from ray import tune

    samplers = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda lo_hi: tune.uniform(*lo_hi),
        "loguniform": lambda lo_hi: tune.loguniform(*lo_hi),
        "randint": lambda lo_hi: tune.randint(*lo_hi),
    }
    return {p.path: p.values[0] if p.kind == "constant" else samplers[p.kind](list(p.values)) for p in space.params}


def trial_values(config: dict[str, Any], space: Space) -> dict[str, Any]:
    """The space's values in a Tune trial's ``config``, JSON-able (numpy scalars to Python)."""
    return {p.path: json.loads(json.dumps(config[p.path], default=_plain)) for p in space.params if p.path in config}


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else str(v)
