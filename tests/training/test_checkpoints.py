"""Checkpoints between the worker's disk and the checkpoint location: mirrored uploads with a
manifest, and resuming from the newest checkpoint that loads, past torn and empty ones.

The resume tests use real fairseq checkpoints (the `interval_run` fixture trains once); the
upload tests use a local directory and a real S3 endpoint (moto's server on 127.0.0.1).
"""

import hashlib
import json
import shutil

import pytest

from lmforge.training import checkpoints
from lmforge.io import storage
from lmforge.fairseq_api.calls import SaveEvent
from lmforge.training.checkpoints import Uploader


def test_names_fairseq_gives_checkpoints():
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "checkpoint3.pt", "checkpoint_2_400.pt",
                 "checkpoint.best_loss_3.210.pt"):
        assert checkpoints.is_checkpoint(name), name
    for name in ("checkpoints.json", "run-config.json", "checkpoint_last.pt.tmp", ".checkpoint_last.pt.x.part"):
        assert not checkpoints.is_checkpoint(name), name


def _save(local, names, content):
    for name in names:
        (local / name).write_bytes(content)


@pytest.mark.parametrize("remote", ["local", "s3"])
def test_uploader_mirrors_each_save_and_records_it(tmp_path, remote, request, monkeypatch):
    if remote == "s3":
        endpoint = request.getfixturevalue("moto_s3")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # as the worker's pod gets it
        storage.s3_client(endpoint).create_bucket(Bucket="ckpt")
        uri = "s3://ckpt/run/checkpoints"
    else:
        uri = str(tmp_path / "remote")
    local = tmp_path / "work"
    local.mkdir()
    uploader = Uploader(local, uri)

    _save(local, ["checkpoint_1_4.pt", "checkpoint_best.pt", "checkpoint_last.pt"], b"four")
    assert uploader.after_save(SaveEvent(4, 1, False, 2.5)) == ["checkpoint_1_4.pt", "checkpoint_best.pt",
                                                                "checkpoint_last.pt"]
    # The next save: a new interval checkpoint, checkpoint_last rewritten, best unchanged, the old
    # interval checkpoint pruned by fairseq (keep_interval_updates=1).
    (local / "checkpoint_1_4.pt").unlink()
    _save(local, ["checkpoint_1_8.pt", "checkpoint_last.pt"], b"eight!")
    assert uploader.after_save(SaveEvent(8, 1, False, 2.5)) == ["checkpoint_1_8.pt", "checkpoint_last.pt"]

    assert sorted(storage.list_files(uri)) == ["checkpoint_1_8.pt", "checkpoint_best.pt", "checkpoint_last.pt",
                                                "checkpoints.json"]
    manifest = json.loads(storage.read_text(storage.join(uri, "checkpoints.json")))
    entries = manifest["checkpoints"]
    assert entries["checkpoint_last.pt"]["num_updates"] == 8 and entries["checkpoint_best.pt"]["num_updates"] == 4
    assert entries["checkpoint_last.pt"]["size"] == 6
    assert entries["checkpoint_last.pt"]["sha256"] == hashlib.sha256(b"eight!").hexdigest()
    assert storage.read_range(storage.join(uri, "checkpoint_last.pt"), 0, 100) == b"eight!"
    assert manifest["best_loss"] == 2.5
    # a new uploader (a restarted worker) continues the same manifest
    assert Uploader(local, uri).manifest["checkpoints"].keys() == entries.keys()


def test_order_is_newest_first_by_recorded_updates(tmp_path):
    uri = tmp_path / "ckpt"
    uri.mkdir()
    for name in ("checkpoint_best.pt", "checkpoint_1_4.pt", "checkpoint_1_8.pt", "checkpoint_last.pt", "checkpoint2.pt"):
        (uri / name).write_bytes(b"x")
    manifest = {"checkpoints": {"checkpoint_best.pt": {"num_updates": 4}, "checkpoint_1_8.pt": {"num_updates": 8}}}
    # checkpoint_last.pt without an entry was written by someone else: newest by definition
    assert checkpoints.candidates(str(uri), manifest) == [
        "checkpoint_last.pt", "checkpoint_1_8.pt", "checkpoint_1_4.pt", "checkpoint_best.pt", "checkpoint2.pt",
    ]


def test_resume_takes_the_newest_checkpoint(interval_run, tmp_path):
    staged = checkpoints.stage_newest(str(interval_run["checkpoints"]), tmp_path / "work")
    assert staged == {"name": "checkpoint_last.pt", "num_updates": 12}
    assert (tmp_path / "work" / "checkpoint_last.pt").stat().st_size == \
        (interval_run["checkpoints"] / "checkpoint_last.pt").stat().st_size


def test_truncated_checkpoint_last_is_skipped_for_the_previous_one(interval_run, tmp_path):
    uri = tmp_path / "ckpt"
    shutil.copytree(interval_run["checkpoints"], uri)
    last = uri / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # torn, e.g. a disk that filled up

    staged = checkpoints.stage_newest(str(uri), tmp_path / "work")
    assert staged == {"name": "checkpoint_1_12.pt", "num_updates": 12}
    assert checkpoints.loadable_state(tmp_path / "work" / "checkpoint_last.pt") == {"num_updates": 12}


def test_without_a_manifest_torn_and_empty_checkpoints_fail_to_load_and_are_passed_over(interval_run, tmp_path):
    uri = tmp_path / "ckpt"
    shutil.copytree(interval_run["checkpoints"], uri)
    (uri / "checkpoints.json").unlink()
    (uri / "checkpoint_best.pt").unlink()
    last = uri / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[:-1000])
    (uri / "checkpoint_1_12.pt").write_bytes(b"")

    assert checkpoints.stage_newest(str(uri), tmp_path / "work") == {"name": "checkpoint_1_8.pt", "num_updates": 8}


def test_nothing_loads_means_a_fresh_start_and_a_clean_work_dir(tmp_path):
    uri = tmp_path / "ckpt"
    uri.mkdir()
    (uri / "checkpoint_last.pt").write_bytes(b"not a checkpoint")
    work = tmp_path / "work"
    work.mkdir()
    (work / "checkpoint_last.pt").write_bytes(b"left over from an earlier attempt")
    assert checkpoints.stage_newest(str(uri), work) is None
    assert not list(work.glob("*.pt"))


def test_the_other_processes_of_a_node_reuse_what_the_first_staged(interval_run, tmp_path):
    work = tmp_path / "work"
    first = checkpoints.stage_newest(str(interval_run["checkpoints"]), work)
    mtime = (work / "checkpoint_last.pt").stat().st_mtime_ns
    assert checkpoints.stage_newest(str(interval_run["checkpoints"]), work) == first
    assert (work / "checkpoint_last.pt").stat().st_mtime_ns == mtime, "not copied again"
    # once training writes over it, the next start stages again
    (work / "checkpoint_last.pt").write_bytes(b"overwritten by fairseq")
    assert checkpoints.stage_newest(str(interval_run["checkpoints"]), work) == first
    assert checkpoints.loadable_state(work / "checkpoint_last.pt") == {"num_updates": 12}


def test_summary_reads_the_manifest(interval_run):
    summary = checkpoints.summary(str(interval_run["checkpoints"]))
    assert summary["num_updates"] == 12 and summary["epochs"] == 0
    assert summary["checkpoint_best"] == str(interval_run["checkpoints"] / "checkpoint_best.pt")
    assert summary["best_valid_loss"] > 0


def test_summary_without_checkpoints_names_the_fix(tmp_path):
    with pytest.raises(Exception, match="max_epoch/max_update"):
        checkpoints.summary(str(tmp_path))
