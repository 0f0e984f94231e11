"""Loading the run config: YAML and `--set` overrides, JSON, the shipped configs, local paths.

In: a YAML file (`pipelines/configs/*.yaml`) and `--set section.field=value` overrides, or the
config's JSON (as the pipeline parameter carries it, whole or cut to one data stage). Out: a
frozen, validated `RunConfig`; every problem is named in one `ConfigError` before any
expensive work starts.

    lmforge config show --config pipelines/configs/tiny.yaml --set train.max_epoch=3
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import presets
from lmforge.config.schema import CorpusConfig, RunConfig, is_dataclass_type
from lmforge.config.validation import validate, without_unparsed
from lmforge.errors import ConfigError, LmforgeError


@dataclass(frozen=True)
class _CommandLineScalar:
    """A `--set` value read as YAML, with its text kept: `corpus.sha256=0123...` is a str field
    whose digits YAML would otherwise turn into an int (and lose the leading zero)."""

    text: str
    parsed: Any


def _plain(value: Any) -> Any:
    """Free-form values (model.options, train.extra_args) keep YAML's reading of --set values."""
    if isinstance(value, _CommandLineScalar):
        return value.parsed
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


# What `_check_value` returns for a value of the wrong type: the field keeps its default, so the
# range checks of the other fields still run (and every bad field is named in one error).
_UNPARSED = object()


def _check_value(value: Any, tp: Any, path: str, problems: list[str], unparsed: list[str]) -> Any:
    """Coerce `value` to `tp` where the coercion is lossless (int -> float), else record a problem
    and return `_UNPARSED`; `unparsed` collects the paths of fields (inside mappings too) left at
    their default."""
    if isinstance(value, _CommandLineScalar):
        wants_str = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))
        value = value.text if wants_str and value.parsed is not None else value.parsed
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(value, inner[0], path, problems, unparsed)
    if is_dataclass_type(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return _UNPARSED
        return _build(tp, value, path, problems, unparsed)
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping, got {type(value).__name__}")
            return _UNPARSED
        return {key: _plain(item) for key, item in value.items()}
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {type(value).__name__}")
            return _UNPARSED
        return [_plain(item) for item in value]
    if tp is Any:
        return _plain(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string, not a float.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        problems.append(f"{path}: expected {tp.__name__}, got {value!r}")
        return _UNPARSED
    if not isinstance(value, tp):
        problems.append(f"{path}: expected {tp.__name__}, got {value!r}")
        return _UNPARSED
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str], unparsed: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            problems.append(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            where = f"{prefix}.{f.name}" if prefix else f.name
            value = _check_value(data[f.name], hints[f.name], where, problems, unparsed)
            if value is _UNPARSED:
                unparsed.append(where)
            else:
                kwargs[f.name] = value
    return cls(**kwargs)


def _checked(data: dict[str, Any], problems: list[str], unparsed: list[str], sections: Any = None) -> RunConfig:
    """The typed config of `data`, or one ConfigError naming the type problems and the range
    problems together. A field of the wrong type keeps its default, and a range problem that names
    a field which did not parse is left out (its check read the default, not the user's value).
    `sections`: report range problems of these top-level sections only (None: all)."""
    cfg = _build(RunConfig, data, "", problems, unparsed)
    for problem in without_unparsed(validate(cfg), unparsed):
        if sections is None or problem.split(".", 1)[0].split(":", 1)[0] in sections:
            problems.append(problem)
    if problems:
        raise ConfigError(problems)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_epoch=3` -> (["train", "max_epoch"], 3); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {text!r}: expected section.field=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (int, float, bool)):
        value = _CommandLineScalar(raw.strip(), value)
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"--set {text!r}: {part} is not a section"])
            node = child
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file {path} does not exist (pass --config with a YAML file)"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError([f"{path}:{where}: malformed YAML ({problem}); fix the file"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"])
    return data


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Typed config from plain data; raises one ConfigError listing every problem."""
    problems: list[str] = []
    data = presets.apply(data, problems)
    # an unknown preset filled in nothing: checks that name it (adaptive_loss's) would mislead
    return _checked(data, problems, ["model.preset"] if problems else [])


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))


def from_json(text: str) -> RunConfig:
    return from_dict(json.loads(text))


# The config sections each data stage depends on. A data stage's task takes only
# these (as `stage_json`), never the pipeline run id, so KFP's cache, which keys
# on a task's inputs, hits exactly when the content and that stage's settings
# are unchanged: training longer does not re-run preprocessing.
STAGE_SECTIONS = {
    "download": ("corpus", "storage"),
    "preprocess": ("preprocess", "storage"),
}


def stage_json(cfg: RunConfig, stage: str) -> str:
    """Canonical JSON of the sections `stage` depends on; `from_json` reads it back (the rest default)."""
    data = cfg.to_dict()
    return json.dumps({section: data[section] for section in STAGE_SECTIONS[stage]}, sort_keys=True)


def from_stage_json(text: str) -> RunConfig:
    """A config from `stage_json` output: its sections as given and validated, the others default."""
    data = json.loads(text)
    return _checked(data, [], [], sections=data)


def content_key(*parts: str) -> str:
    """A short digest naming a data stage's output directory: the same inputs, the same place."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- shipped configs

SHIPPED = Path(__file__).parents[1] / "configs"  # pipelines/configs/ links here


def shipped_config_path(name: str) -> Path:
    return SHIPPED / f"{name}.yaml"


def default_config() -> RunConfig:
    """The default run: WikiText-2 from its official location."""
    return load(shipped_config_path("wikitext-2"))


# --------------------------------------------------------------------------- this machine's paths


def with_corpus(cfg: RunConfig, source: str) -> RunConfig:
    """`cfg` reading `source` instead: the pins and archive members of the config's own
    source describe something else, so they go too (`lmforge run --corpus DIR`)."""
    return cfg.replace(corpus=CorpusConfig(source=source))


def resolve_storage(cfg: RunConfig) -> RunConfig:
    """An absolute storage.root: steps run in other processes and directories."""
    if "://" in cfg.storage.root:
        return cfg
    root = str(Path(cfg.storage.root).expanduser().resolve())
    return cfg.replace(storage=dataclasses.replace(cfg.storage, root=root))


def resolve_local_paths(cfg: RunConfig) -> RunConfig:
    """Absolute paths for the local parts of the config (corpus.source, storage.root): steps run in
    other processes and directories. A local corpus that does not exist is an LmforgeError."""
    # The catalog is a pure table of names (no I/O, imports only lmforge.errors): a catalog name
    # such as wikitext-2 is not a path.
    from lmforge.data import catalog

    corpus = cfg.corpus
    if "://" not in corpus.source and catalog.lookup(corpus.source) is None:
        source = Path(corpus.source).expanduser()
        if not source.exists():
            raise LmforgeError(
                f"corpus {corpus.source} does not exist; pass --corpus DIR (train.txt, valid.txt, test.txt) "
                "or set corpus.source"
            )
        corpus = dataclasses.replace(corpus, source=str(source.resolve()))
    return resolve_storage(cfg.replace(corpus=corpus))
