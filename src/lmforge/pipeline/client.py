"""Runs on a Kubeflow Pipelines server through the kfp SDK: submit, schedule, list.

In: a run config, the KFP API endpoint and credentials. Out: the pipeline
uploaded (one version per compiled content), a run or a recurring run in an
experiment, or the list of runs. The pipeline is compiled from the same config,
so its pod settings match the config_json the run gets.

    lmforge submit --host URL [--experiment NAME] [--config FILE]
    lmforge schedule --host URL --cron '0 0 3 * * 0'
    lmforge runs --host URL

Authentication is the kfp SDK's: a bearer token (--token or LMFORGE_KFP_TOKEN),
else, in a pod, the projected service-account token kfp.Client reads
(KF_PIPELINES_SA_TOKEN_PATH, default /var/run/secrets/kfp/token), else none
(a port-forward to ml-pipeline-ui or ml-pipeline).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.config import RunConfig
from lmforge.errors import LmforgeError

TOKEN_ENV = "LMFORGE_KFP_TOKEN"
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp's own variable
SA_TOKEN_DEFAULT = "/var/run/secrets/kfp/token"


@dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    version_id: str
    version_name: str


def connect(host: str, token: str | None = None) -> Any:
    """A kfp.Client for `host`, authenticated as the kfp SDK supports it."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    if not host.startswith(("http://", "https://")):
        raise LmforgeError(f"--host {host!r}: give the URL with its scheme, e.g. http://localhost:8080")
    token = token or os.environ.get(TOKEN_ENV) or None
    credentials = None
    sa_token = Path(os.environ.get(SA_TOKEN_ENV, SA_TOKEN_DEFAULT))
    if token is None and sa_token.is_file():
        credentials = ServiceAccountTokenVolumeCredentials(path=str(sa_token))
    try:
        with warnings.catch_warnings():
            # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later": said on every call.
            warnings.simplefilter("ignore", FutureWarning)
            return kfp.Client(host=host, existing_token=token, credentials=credentials)
    except Exception as exc:  # the constructor asks the server whether it is multi-user
        raise LmforgeError(f"cannot reach Kubeflow Pipelines at {host} ({_reason(exc)}); check --host and --token")


def _reason(exc: Exception) -> str:
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    if status:
        return f"HTTP {status} {reason or ''}".strip()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _call(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A kfp.Client call whose failure becomes one line naming what failed."""
    try:
        return fn(*args, **kwargs)
    except LmforgeError:
        raise
    except Exception as exc:
        raise LmforgeError(f"{what} failed: {_reason(exc)}") from None


def namespace_of(client: Any, cfg: RunConfig) -> str | None:
    """The profile namespace in a multi-user Kubeflow; None where KFP has no namespaces."""
    healthz = _call("asking the server whether it is multi-user", client.get_kfp_healthz)
    return cfg.cluster.namespace if getattr(healthz, "multi_user", False) else None


def _filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def upload(client: Any, package: Path, pipeline_name: str) -> Uploaded:
    """The pipeline `pipeline_name` with a version holding `package`: uploaded unless that content is there."""
    from lmforge.pipeline.definition import PIPELINE_DESCRIPTION

    digest = hashlib.sha256(package.read_bytes()).hexdigest()
    version_name = f"{pipeline_name}-{__version__}-{digest[:12]}"
    pipeline_id = _call("looking up the pipeline", client.get_pipeline_id, pipeline_name)
    if pipeline_id is None:
        # Uploaded without a namespace: shared, so every profile finds it under the same name.
        pipeline = _call("uploading the pipeline", client.upload_pipeline, str(package),
                         pipeline_name=pipeline_name, description=PIPELINE_DESCRIPTION)
        pipeline_id = pipeline.pipeline_id
    else:
        found = _call("listing pipeline versions", client.list_pipeline_versions, pipeline_id,
                      filter=_filter(version_name)).pipeline_versions
        if found:
            return Uploaded(pipeline_id, found[0].pipeline_version_id, version_name)
    version = _call("uploading the pipeline version", client.upload_pipeline_version, str(package),
                    pipeline_version_name=version_name, pipeline_id=pipeline_id,
                    description=f"lmforge {__version__}, compiled pipeline sha256 {digest}")
    return Uploaded(pipeline_id, version.pipeline_version_id, version_name)


def _prepare(client: Any, cfg: RunConfig, experiment: str | None) -> tuple[Uploaded, str, str | None]:
    from lmforge.pipeline.compile import compile_pipeline
    from lmforge.pipeline.definition import PIPELINE_NAME

    with tempfile.TemporaryDirectory(prefix="lmforge-submit-") as tmp:
        uploaded = upload(client, compile_pipeline(cfg, Path(tmp) / "lmforge.yaml"), PIPELINE_NAME)
    namespace = namespace_of(client, cfg)
    name = experiment or cfg.tracking.experiment
    exp = _call(f"creating experiment {name!r}", client.create_experiment, name, namespace=namespace)
    return uploaded, exp.experiment_id, namespace


def check_runs_on_a_cluster(cfg: RunConfig) -> None:
    """The configure step refuses a storage.root one pod alone sees; say so before anything is uploaded."""
    from lmforge.config import cluster_storage_problems
    from lmforge.errors import ConfigError

    problems = cluster_storage_problems(cfg)
    if problems:
        raise ConfigError(problems)


def run_parameters(cfg: RunConfig) -> dict[str, Any]:
    """What the run gets: the whole config; the run-form fields keep their 'as in config_json' defaults."""
    return {"config_json": cfg.to_json()}


def submit(cfg: RunConfig, host: str, *, experiment: str | None = None, token: str | None = None,
           run_name: str | None = None) -> dict[str, str]:
    check_runs_on_a_cluster(cfg)
    client = connect(host, token)
    uploaded, experiment_id, _ = _prepare(client, cfg, experiment)
    run = _call("creating the run", client.run_pipeline, experiment_id,
                job_name=run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                params=run_parameters(cfg), pipeline_id=uploaded.pipeline_id, version_id=uploaded.version_id,
                service_account=cfg.cluster.service_account or None)
    return {"run_id": run.run_id, "experiment_id": experiment_id, "pipeline_id": uploaded.pipeline_id,
            "pipeline_version": uploaded.version_name}


def check_cron(cron: str) -> str:
    """KFP's scheduler reads cron with a leading seconds field (robfig/cron): six fields."""
    fields = cron.split()
    if len(fields) != 6:
        raise LmforgeError(
            f"--cron {cron!r}: KFP's cron has 6 fields, seconds first (e.g. '0 0 3 * * 0' = Sundays 03:00)"
        )
    return " ".join(fields)


def schedule(cfg: RunConfig, host: str, cron: str, *, experiment: str | None = None, token: str | None = None,
             name: str | None = None) -> dict[str, str]:
    """A recurring run for scheduled retraining: one run at a time (max_concurrency 1), and no catch-up, so a
    paused schedule resumes with one run rather than one per missed slot."""
    cron = check_cron(cron)
    check_runs_on_a_cluster(cfg)
    client = connect(host, token)
    uploaded, experiment_id, _ = _prepare(client, cfg, experiment)
    recurring = _call("creating the recurring run", client.create_recurring_run, experiment_id,
                      job_name=name or f"{cfg.name}-retraining", cron_expression=cron, max_concurrency=1,
                      no_catchup=True, params=run_parameters(cfg), pipeline_id=uploaded.pipeline_id,
                      version_id=uploaded.version_id, service_account=cfg.cluster.service_account or None)
    return {"recurring_run_id": recurring.recurring_run_id, "experiment_id": experiment_id, "cron": cron,
            "pipeline_version": uploaded.version_name}


def list_runs(cfg: RunConfig, host: str, *, experiment: str | None = None, token: str | None = None,
              limit: int = 20) -> dict[str, list[dict[str, Any]]]:
    """The newest runs and the recurring runs (of `experiment` if given)."""
    client = connect(host, token)
    namespace = namespace_of(client, cfg)
    experiment_id = None
    if experiment:
        experiment_id = _call(f"finding experiment {experiment!r}", client.get_experiment,
                              experiment_name=experiment, namespace=namespace).experiment_id
    runs = _call("listing runs", client.list_runs, page_size=limit, sort_by="created_at desc",
                 experiment_id=experiment_id, namespace=namespace).runs or []
    recurring = _call("listing recurring runs", client.list_recurring_runs, page_size=limit,
                      sort_by="created_at desc", experiment_id=experiment_id, namespace=namespace).recurring_runs or []
    return {
        "runs": [{"run_id": r.run_id, "name": r.display_name, "state": r.state, "created_at": str(r.created_at)}
                 for r in runs],
        "recurring_runs": [
            {"recurring_run_id": r.recurring_run_id, "name": r.display_name, "status": r.status,
             "cron": r.trigger.cron_schedule.cron if r.trigger and r.trigger.cron_schedule else "",
             "max_concurrency": r.max_concurrency, "no_catchup": r.no_catchup}
            for r in recurring
        ],
    }


def format_runs(listing: dict[str, list[dict[str, Any]]]) -> str:
    lines = [f"{'RUN ID':<38} {'STATE':<10} {'CREATED':<26} NAME"]
    lines += [f"{r['run_id']:<38} {r['state'] or '':<10} {r['created_at']:<26} {r['name']}" for r in listing["runs"]]
    if listing["recurring_runs"]:
        lines += ["", f"{'RECURRING RUN ID':<38} {'STATUS':<10} {'CRON':<26} NAME"]
        lines += [f"{r['recurring_run_id']:<38} {r['status'] or '':<10} {r['cron']:<26} {r['name']}"
                  for r in listing["recurring_runs"]]
    return "\n".join(lines)
