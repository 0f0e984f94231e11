"""The promotion gate: which registered version people get under the `champion` alias.

In: a new model version's evaluation identity and gate metric (version tags written by
`lmforge.models.register`), and the current champion's. Out: the alias the version takes,
`champion` or `challenger`, and a one-line reason, written as version tags.

The rule (`decide`, a pure function): the first version of a name becomes champion; a
later one takes champion only if its gate metric strictly beats the champion's on an
identical evaluation identity (same dictionary, same scored split, same settings);
otherwise it becomes challenger, tagged "worse: ..." or "not comparable ...: differs in ...".
Which metric and which way is better is the version's training task's (`lmforge.tasks`; its
`task` tag, language_modeling for versions without one): perplexity, lower is better.

Concurrent registrations are decided one at a time, in version order: MLflow hands out
version numbers atomically and each version is created already tagged "pending"; a
version's gate waits until every older pending version of the name is decided (or has
been pending for `PENDING_TIMEOUT_S`, i.e. its registration died). An alias names one
version, so there is exactly one champion.

People inspect and override with the CLI; an override leaves a tag with who and why:

    lmforge models [NAME] [--alias ALIAS]
    lmforge promote NAME VERSION|ALIAS --to champion --reason "..." [--by WHO]
"""

from __future__ import annotations

import datetime
import getpass
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from lmforge.config.validation import alias_problem
from lmforge import tasks
from lmforge.errors import LmforgeError
from lmforge.tasks.base import GateMetric

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"

# Version tags written by lmforge.models.register (lineage) and read here.
TAG_IDENTITY = "eval_identity"  # sha256 of the identity's canonical JSON
TAG_IDENTITY_JSON = "eval_identity_json"
TAG_CHECKPOINT = "checkpoint_sha256"
TAG_TASK = "task"  # the training task; its gate metric's tag holds the number compared
# Written by the gate and by overrides.
TAG_GATE = "lmforge.gate"  # "pending" from creation until decided, then "decided"
TAG_DECISION = "lmforge.promotion"  # champion | challenger
TAG_REASON = "lmforge.promotion_reason"
TAG_OVERRIDE = "lmforge.override"

#: How long a pending older version may hold up a newer one's gate before it counts as abandoned.
PENDING_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------- the decision (pure)


@dataclass(frozen=True)
class Candidate:
    """A model version as the gate sees it; identity/value None when the tags are absent."""

    version: str
    identity: dict[str, Any] | None
    value: float | None  # the gate metric


@dataclass(frozen=True)
class Decision:
    role: str  # CHAMPION or CHALLENGER
    reason: str


def _short(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 else text  # sha256s shortened, as git does


def identity_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """'key (a's value vs b's value)' for every key where the identities differ, sorted by key."""
    return [
        f"{key} ({_short(a.get(key))} vs {_short(b.get(key))})"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def decide(candidate: Candidate, champion: Candidate | None, metric: GateMetric) -> Decision:
    """Champion or challenger for `candidate`, given the current champion (None: there is none)
    and the task's gate metric."""
    if champion is None:
        return Decision(CHAMPION, "first model for this name")
    if champion.identity is None or champion.value is None:
        return Decision(CHALLENGER, f"not comparable: champion v{champion.version} has no evaluation identity")
    if candidate.identity is None or candidate.value is None:
        return Decision(CHALLENGER, "not comparable: this version has no evaluation identity")
    differences = identity_differences(candidate.identity, champion.identity)
    if differences:
        return Decision(
            CHALLENGER, f"not comparable with champion v{champion.version}: differs in " + ", ".join(differences)
        )
    ours, theirs = _fmt(candidate.value), _fmt(champion.value)
    if metric.beats(candidate.value, champion.value):  # NaN never beats: never promoted
        return Decision(CHAMPION, f"better: {metric.name} {ours} beats champion v{champion.version}'s {theirs}")
    return Decision(
        CHALLENGER, f"worse: {metric.name} {ours} does not beat champion v{champion.version}'s {theirs}"
    )


def _fmt(value: float) -> str:
    return f"{value:.6g}" if math.isfinite(value) else str(value)


# --------------------------------------------------------------------------- MLflow I/O


def gate_metric_of(version: Any) -> GateMetric:
    """The gate metric of a ModelVersion's task (versions registered before the tag: language modeling)."""
    return tasks.get((version.tags or {}).get(TAG_TASK) or tasks.DEFAULT).gate_metric


def candidate_of(version: Any, metric: GateMetric) -> Candidate:
    """A Candidate from an MLflow ModelVersion's tags, its value the `metric`'s tag."""
    tags = version.tags or {}
    identity = None
    if tags.get(TAG_IDENTITY_JSON):
        try:
            identity = json.loads(tags[TAG_IDENTITY_JSON])
        except ValueError:
            identity = None
    try:
        value = float(tags[metric.tag]) if tags.get(metric.tag) else None
    except ValueError:
        value = None
    return Candidate(str(version.version), identity, value)


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version `alias` points at, None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def wait_for_older_pending(client: Any, name: str, version: str, *, timeout_s: float = PENDING_TIMEOUT_S) -> None:
    """Block until no version older than `version` is still pending (or it timed out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now_ms = time.time() * 1000
        pending = [
            v for v in client.search_model_versions(f"name = '{name}' and tags.`{TAG_GATE}` = 'pending'")
            if int(v.version) < int(version) and now_ms - v.creation_timestamp < timeout_s * 1000
        ]
        if not pending or time.monotonic() > deadline:
            return
        log.info("promotion gate: waiting for older version(s) %s of %s", [v.version for v in pending], name)
        time.sleep(0.5)


def run_gate(
    client: Any, name: str, version: str, *, champion_alias: str = CHAMPION, challenger_alias: str = CHALLENGER,
    timeout_s: float = PENDING_TIMEOUT_S,
) -> Decision:
    """Decide `version` against the current champion and write the alias and tags."""
    mv = client.get_model_version(name, version)
    if (mv.tags or {}).get(TAG_GATE) == "decided":  # a re-run of the same registration
        return Decision(mv.tags.get(TAG_DECISION, CHALLENGER), mv.tags.get(TAG_REASON, ""))
    wait_for_older_pending(client, name, version, timeout_s=timeout_s)
    current = alias_version(client, name, champion_alias)
    if current is not None and str(current.version) == str(version):
        # A retried registration that got as far as the alias: keep it, finish the tags.
        current, decision = None, Decision(CHAMPION, (mv.tags or {}).get(TAG_REASON) or "first model for this name")
    else:
        metric = gate_metric_of(mv)  # the champion is read by the candidate's metric: one yardstick
        decision = decide(
            candidate_of(mv, metric), candidate_of(current, metric) if current is not None else None, metric
        )
    alias = champion_alias if decision.role == CHAMPION else challenger_alias
    client.set_model_version_tag(name, version, TAG_DECISION, decision.role)
    client.set_model_version_tag(name, version, TAG_REASON, decision.reason)
    client.set_registered_model_alias(name, alias, version)
    if decision.role == CHAMPION and current is not None:
        client.set_model_version_tag(name, current.version, TAG_REASON, f"replaced by v{version}: {decision.reason}")
    # Last: a newer version's gate proceeds once this one is no longer pending.
    client.set_model_version_tag(name, version, TAG_GATE, "decided")
    log.info("%s v%s -> %s (%s)", name, version, alias, decision.reason)
    return decision


def require_model(client: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise LmforgeError(
                f"registered model {name!r} does not exist; `lmforge models` lists the registered names"
            ) from None
        raise


def resolve_version(client: Any, name: str, version_or_alias: str) -> Any:
    """A ModelVersion by number ("3", "v3") or alias ("champion"); one-line errors when absent."""
    from mlflow.exceptions import MlflowException

    model = require_model(client, name)
    text = str(version_or_alias)
    number = text[1:] if text[:1] == "v" and text[1:].isdigit() else text
    if number.isdigit():
        try:
            return client.get_model_version(name, number)
        except MlflowException:
            raise LmforgeError(f"{name} has no version {number}; `lmforge models {name}` lists them") from None
    found = alias_version(client, name, text)
    if found is None:
        known = ", ".join(sorted(model.aliases)) or "none"
        raise LmforgeError(f"{name} has no alias {text!r} (aliases: {known}); `lmforge models {name}` lists them")
    return found


def promote(
    client: Any, name: str, version_or_alias: str, alias: str, *, reason: str, by: str | None = None
) -> dict[str, str]:
    """Point `alias` at a version by hand, tagging who and why on it (and on the version it leaves)."""
    if not reason or not reason.strip():
        raise LmforgeError("say why: pass --reason TEXT (it is kept as a tag on the version)")
    problem = alias_problem("alias", alias)
    if problem:
        raise LmforgeError(problem)
    target = resolve_version(client, name, version_or_alias)
    who = by or getpass.getuser()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    previous = alias_version(client, name, alias)
    note = f"{alias} set by {who} at {when}: {reason.strip()}"
    client.set_registered_model_alias(name, alias, target.version)
    client.set_model_version_tag(name, target.version, TAG_OVERRIDE, note)
    if alias in (CHAMPION, CHALLENGER):
        client.set_model_version_tag(name, target.version, TAG_DECISION, alias)
    if previous is not None and previous.version != target.version:
        client.set_model_version_tag(
            name, previous.version, TAG_OVERRIDE, f"{alias} moved to v{target.version} by {who} at {when}: {reason.strip()}"
        )
    return {"name": name, "version": str(target.version), "alias": alias, "previous": str(previous.version) if previous else "", "note": note}


def describe_versions(client: Any, name: str) -> list[dict[str, str]]:
    """One row per version of `name`, newest first: aliases, gate metric ("perplexity" for language
    models), identity, decision, notes."""
    model = require_model(client, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        tags = mv.tags or {}
        rows.append({
            "version": str(mv.version),
            "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
            "perplexity": tags.get(gate_metric_of(mv).tag, ""),
            "identity": tags.get(TAG_IDENTITY, "")[:12],
            "decision": tags.get(TAG_DECISION, ""),
            "reason": tags.get(TAG_REASON, ""),
            "override": tags.get(TAG_OVERRIDE, ""),
        })
    return rows


def describe_models(client: Any) -> list[dict[str, str]]:
    """One row per registered model: name, latest version, aliases."""
    rows = []
    for model in client.search_registered_models():
        latest = max((int(v.version) for v in model.latest_versions or []), default=0)
        aliases = ", ".join(f"{a}=v{v}" for a, v in sorted((model.aliases or {}).items()))
        rows.append({"name": model.name, "latest": str(latest or ""), "aliases": aliases})
    return rows
