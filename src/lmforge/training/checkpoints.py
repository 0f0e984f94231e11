"""Checkpoints between a worker's local disk and the checkpoint location (a path or s3:// URI).

In: the local directory fairseq saves into and the checkpoint URI. Out:
- `Uploader.after_save`: every checkpoint file fairseq wrote or replaced in a save is copied to
  the URI (storage.put_file: temporary name + rename locally; upload + size/sha256 check on S3),
  files fairseq pruned (keep_interval_updates, keep_last_epochs) are deleted there too, and
  `checkpoints.json` (name -> updates, epoch, size, sha256, best loss) is rewritten last;
- `stage_newest`: before training, the newest checkpoint at the URI that loads is copied into
  the local directory as checkpoint_last.pt (what fairseq resumes from), passing over a torn,
  empty or mismatching one (what loads is lmforge.data.integrity's call), each with its reason
  logged; `resume_plan` says the same without staging anything (`lmforge train --dry-run`);
- `summary`: what training reached, read from `checkpoints.json` without downloading a model.

The worker (`lmforge worker`) does all three; nothing here imports fairseq.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.data import integrity
from lmforge.io import storage
from lmforge.errors import LmforgeError
from lmforge.fairseq_api.calls import SaveEvent

log = logging.getLogger(__name__)

MANIFEST = "checkpoints.json"
LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
_STAGED = ".staged.json"  # what stage_newest put in the local directory, for the node's other processes
# The names fairseq gives checkpoints: checkpoint_last, checkpoint_best, checkpoint<epoch>,
# checkpoint_<epoch>_<updates>, checkpoint.best_<metric>_<value> (keep_best_checkpoints).
_CHECKPOINT = re.compile(r"^checkpoint(_last|_best|\d+|_\d+_\d+|\.best_.+)\.pt$")


def is_checkpoint(name: str) -> bool:
    return bool(_CHECKPOINT.match(name))


def read_manifest(uri: str) -> dict[str, Any]:
    """The checkpoint location's manifest ({"checkpoints": {name: entry}}); empty when there is none."""
    path = storage.join(uri, MANIFEST)
    if not storage.exists(path):
        return {"checkpoints": {}}
    try:
        manifest = json.loads(storage.read_text(path))
    except ValueError:
        log.warning("%s is not valid JSON; ignoring it", path)
        return {"checkpoints": {}}
    manifest.setdefault("checkpoints", {})
    return manifest


def _write_manifest(uri: str, manifest: dict[str, Any]) -> None:
    storage.put_text(json.dumps(manifest, indent=2, sort_keys=True), storage.join(uri, MANIFEST))


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime_ns) of the checkpoint files in `directory`."""
    found = {}
    for path in directory.iterdir() if directory.is_dir() else ():
        if path.is_file() and is_checkpoint(path.name):
            stat = path.stat()
            found[path.name] = (stat.st_size, stat.st_mtime_ns)
    return found


class Uploader:
    """Mirrors the local save directory of the job's rank 0 to the checkpoint URI, save by save."""

    def __init__(self, local_dir: str | Path, uri: str) -> None:
        self.local_dir = Path(local_dir)
        self.uri = uri
        self.known = _snapshot(self.local_dir)  # what is already there (a staged checkpoint_last.pt)
        self.manifest = read_manifest(uri)

    def after_save(self, event: SaveEvent) -> list[str]:
        """Upload what this save wrote, delete what it pruned, then rewrite the manifest. Returns the uploaded names."""
        now = _snapshot(self.local_dir)
        changed = sorted(name for name, stat in now.items() if self.known.get(name) != stat)
        # checkpoint_last.pt last: whoever sees a new one at the URI also finds the others of its save
        changed.sort(key=lambda name: name == LAST)
        entries = self.manifest["checkpoints"]
        for name in changed:
            result = storage.put_file(self.local_dir / name, storage.join(self.uri, name))
            entries[name] = {
                "num_updates": event.num_updates, "epoch": event.epoch, "epochs_completed": event.epochs_completed,
                "best_loss": event.best_loss, "size": result["size"], "sha256": result["sha256"],
            }
            log.info("uploaded %s (%d updates, %d bytes, sha256 %s) to %s", name, event.num_updates,
                     result["size"], result["sha256"][:12], self.uri)
        for name in sorted(set(self.known) - set(now)):
            storage.delete(storage.join(self.uri, name))
            entries.pop(name, None)
            log.info("deleted %s from %s (pruned by fairseq)", name, self.uri)
        self.manifest["best_loss"] = event.best_loss
        _write_manifest(self.uri, self.manifest)
        self.known = now
        log.info("checkpoint of update %d saved at %s", event.num_updates, self.uri)
        return changed


# ------------------------------------------------------------------ resuming


def _order_key(name: str, entry: dict[str, Any] | None) -> tuple[float, int]:
    """Newest first: by the recorded update count; for files without a manifest entry, from the name."""
    # Among equal update counts, the file a save writes first holds the state the others copy.
    tie = {LAST: 3, BEST: 0}.get(name, 2 if re.match(r"^checkpoint_\d+_\d+\.pt$", name) else 1)
    if entry is not None:
        return float(entry["num_updates"]), tie
    if name == LAST:
        return float("inf"), tie  # not written by lmforge: fairseq's newest by definition
    interval = re.match(r"^checkpoint_\d+_(\d+)\.pt$", name)
    return (float(interval.group(1)) if interval else -1.0), tie


def candidates(uri: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """Checkpoint names at `uri`, newest first."""
    manifest = read_manifest(uri) if manifest is None else manifest
    names = [n for n in storage.list_files(uri) if "/" not in n and is_checkpoint(n)]
    entries = manifest["checkpoints"]
    return sorted(names, key=lambda n: _order_key(n, entries.get(n)), reverse=True)


def loadable_state(path: Path) -> dict[str, Any] | None:
    """The checkpoint's training position if training can resume from it, else None (the reason logged)."""
    state, reason = _position(path)
    if reason is not None:
        log.warning("%s: %s", path, reason)
    return state


def _position(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """({num_updates}, None) for a checkpoint training can resume from, else (None, why not)."""
    try:
        state = integrity.read_checkpoint(path, resumable=True)
    except integrity.UnreadableFile as exc:  # torn, empty, not a checkpoint: all mean "try the previous one"
        return None, exc.fault
    return {"num_updates": int(state["optimizer_history"][-1].get("num_updates", 0))}, None


@contextmanager
def node_lock(directory: Path) -> Iterator[None]:
    """One process of this node at a time (the processes of a node share its disk)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def stage_newest(uri: str, local_dir: str | Path) -> dict[str, Any] | None:
    """Put the newest checkpoint of `uri` that loads into `local_dir` as checkpoint_last.pt.

    Returns {name, num_updates} of the staged checkpoint, or None when there is none (a fresh
    start). Every process of a node calls this; the first does the work under a lock and the
    others reuse what it staged, as long as the local copy is untouched.
    """
    local_dir = Path(local_dir)
    with node_lock(local_dir):
        manifest = read_manifest(uri)
        names = candidates(uri, manifest)
        entries = manifest["checkpoints"]
        reusable, staged = _reuse(local_dir, names, entries)
        if reusable:
            return staged
        # Leftovers of an earlier attempt (a torn checkpoint_last.pt, pruned copies) would be
        # resumed from or mirrored back: start from an empty directory.
        shutil.rmtree(local_dir, ignore_errors=True)
        local_dir.mkdir(parents=True)
        for name in names:
            staged = _try_stage(uri, name, entries.get(name), local_dir, names)
            if staged is not None:
                return staged
        if names:
            log.warning("no checkpoint at %s loads (tried %s); training starts from scratch", uri, ", ".join(names))
        (local_dir / _STAGED).write_text(json.dumps({"name": None, "candidates": names}))
        return None


def _reuse(local_dir: Path, names: list[str], entries: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """(True, what was staged) when another process of this node staged the newest checkpoint already."""
    record_file, last = local_dir / _STAGED, local_dir / LAST
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return False, None
    if record.get("candidates") != names:
        return False, None  # the checkpoint location changed since (a later attempt saved there)
    if record.get("name") is None:  # a fresh start, still one if nothing was saved since
        return not any(local_dir.glob("checkpoint*.pt")), None
    entry = entries.get(record["name"]) or {}
    stat = last.stat() if last.is_file() else None
    if stat is None or [stat.st_size, stat.st_mtime_ns] != record.get("local"):
        return False, None  # training went on from it: stage again
    if entry.get("sha256") is None or entry["sha256"] != record.get("sha256"):
        return False, None  # replaced at the URI since (or unknown): stage again
    log.info("checkpoint %s already staged on this node", record["name"])
    return True, {"name": record["name"], "num_updates": record["num_updates"]}


def _remote_problem(uri: str, name: str, entry: dict[str, Any] | None) -> str | None:
    """Why the checkpoint `name` at `uri` is not worth copying, from its size alone (None: copy it)."""
    remote_size = storage.size(storage.join(uri, name))
    if remote_size == 0:
        return "empty (0 bytes)"
    if entry is not None and remote_size != entry["size"]:
        return f"torn: {remote_size} bytes, {entry['size']} were uploaded"
    return None


def _copy_problem(sha256: str, entry: dict[str, Any] | None) -> str | None:
    if entry is not None and sha256 != entry["sha256"]:
        return "its bytes do not match the sha256 recorded at upload"
    return None


def _try_stage(
    uri: str, name: str, entry: dict[str, Any] | None, local_dir: Path, names: list[str]
) -> dict[str, Any] | None:
    remote = storage.join(uri, name)
    reason = _remote_problem(uri, name, entry)
    part = local_dir / (name + ".download")
    if reason is None:
        try:
            reason = _copy_problem(storage.get_file(remote, part)["sha256"], entry)
        except LmforgeError as exc:
            reason = f"could not be copied ({exc})"
    state = None
    if reason is None:
        state, reason = _position(part)
    if state is None:
        log.warning("passing over %s: %s; trying the previous checkpoint", remote, reason)
        part.unlink(missing_ok=True)
        return None
    last = local_dir / LAST
    os.replace(part, last)
    stat = last.stat()
    record = {"name": name, "num_updates": state["num_updates"], "sha256": (entry or {}).get("sha256"),
              "local": [stat.st_size, stat.st_mtime_ns], "candidates": names}
    (local_dir / _STAGED).write_text(json.dumps(record))
    log.info("resuming from %s (%d updates)", remote, state["num_updates"])
    return {"name": name, "num_updates": state["num_updates"]}


def resume_plan(uri: str) -> dict[str, Any]:
    """What `stage_newest` would resume from, staging nothing: {"from": name or None,
    "num_updates", "passed_over": [{"name", "reason"}] newest first}. What `lmforge train
    --dry-run` reports; a checkpoint at an s3:// location is copied to a temporary file to be checked."""
    from lmforge.io.hashing import file_sha256
    from lmforge.io.staging import fetched_file

    manifest = read_manifest(uri)
    entries = manifest["checkpoints"]
    passed_over = []
    for name in candidates(uri, manifest):
        entry = entries.get(name)
        reason = _remote_problem(uri, name, entry)
        state = None
        if reason is None:
            try:
                with fetched_file(storage.join(uri, name)) as local:
                    reason = _copy_problem(file_sha256(local), entry) if entry is not None else None
                    if reason is None:
                        state, reason = _position(local)
            except LmforgeError as exc:
                reason = f"could not be copied ({exc})"
        if state is not None:
            return {"from": name, "num_updates": state["num_updates"], "passed_over": passed_over}
        passed_over.append({"name": name, "reason": reason})
    return {"from": None, "num_updates": 0, "passed_over": passed_over}


# ------------------------------------------------------------------ reading results


def summary(uri: str) -> dict[str, Any]:
    """What training reached: {checkpoint_best, checkpoint_last (locations), epochs, num_updates, best_valid_loss}."""
    manifest = read_manifest(uri)
    entries = manifest["checkpoints"]
    last, best = entries.get(LAST), entries.get(BEST)
    if last is None or best is None:
        raise LmforgeError(
            f"training ended without checkpoint_last.pt and checkpoint_best.pt in {uri}; "
            "check train.max_epoch/max_update (and that validation is not disabled)"
        )
    best_loss = manifest.get("best_loss")
    return {
        "checkpoint_best": storage.join(uri, BEST),
        "checkpoint_last": storage.join(uri, LAST),
        "epochs": max(int(last["epochs_completed"]), 0),
        "num_updates": int(last["num_updates"]),
        "best_valid_loss": float(best_loss) if best_loss is not None else None,
    }
