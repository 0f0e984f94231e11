"""Damaged data-bins and checkpoints through the commands that read them (`lmforge train`, its
`--dry-run`, `evaluate`, `register`): one line naming the file and the fault, exit 1, nothing
launched or written; and the dry run says which checkpoint training would resume from and
which it passes over, and why. Run in-process through `lmforge.cli.main` (fairseq imported
once); the files are copies of the session's small data-bin and tiny LM, damaged by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import FAST_TRAINING, TINY_CONFIG
from lmforge.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def one_line_error(err: str) -> str:
    """The error line, checked to be the only thing lmforge said about the failure."""
    last = err.strip().splitlines()[-1]
    assert last.startswith("lmforge: error: ") and "Traceback" not in err, err[-3000:]
    return last[len("lmforge: error: "):]


@pytest.fixture
def data_bin(small_data_bin, tmp_path) -> Path:
    return Path(shutil.copytree(small_data_bin, tmp_path / "data-bin"))


def train_argv(tmp_path: Path, data_bin: Path, checkpoints: Path, *extra: str) -> list[str]:
    return ["train", "--config", TINY_CONFIG, "--data-bin", data_bin, "--checkpoints", checkpoints,
            *[f"--set={s}" for s in (*FAST_TRAINING, "train.max_update=4", f"train.cache_dir={tmp_path / 'cache'}")],
            *extra]


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


DAMAGE = {
    "truncated train.bin": (lambda d: truncate(d / "train.bin", 1000),
                            "{d}/train.bin is 1000 bytes, but train.idx describes"),
    "idx header": (lambda d: (d / "train.idx").write_bytes(b"GARBAGE!!" + (d / "train.idx").read_bytes()[9:]),
                   "{d}/train.idx is not a fairseq mmap index: its header starts b'GARBAGE!!'"),
    "duplicate symbol": (lambda d: (d / "dict.txt").write_text((d / "dict.txt").read_text() + "the 1\n"),
                         "{d}/dict.txt lists a symbol twice: 'the' on lines "),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "train"])
@pytest.mark.parametrize("damage", DAMAGE, ids=DAMAGE)
def test_train_names_the_damaged_file_before_launch(capsys, tmp_path, data_bin, damage, dry_run):
    corrupt, needle = DAMAGE[damage]
    corrupt(data_bin)
    checkpoints = tmp_path / "ckpt"
    status, out, err = run(capsys, *train_argv(tmp_path, data_bin, checkpoints, *(["--dry-run"] if dry_run else [])))
    line = one_line_error(err)
    assert status == 1 and line.startswith("cannot train: ") and needle.format(d=data_bin) in line, line
    assert line.endswith("preprocess the corpus again") and out == ""
    assert not checkpoints.exists(), "nothing launched: not even the run config is written"


def test_dry_run_reports_the_checkpoint_it_resumes_from_and_those_it_passes_over(capsys, tmp_path, data_bin,
                                                                                  tiny_lm):
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "checkpoint_last.pt").write_bytes(b"")  # a save that never happened
    good = tiny_lm.checkpoint.read_bytes()
    (checkpoints / "checkpoint_1_3.pt").write_bytes(good[: len(good) // 3])  # a copy cut short
    (checkpoints / "checkpoint_best.pt").write_bytes(good)
    status, out, err = run(capsys, *train_argv(tmp_path, data_bin, checkpoints, "--dry-run"))
    assert status == 0, err[-3000:]
    resume = json.loads(out)["resume"]
    assert resume == {"from": "checkpoint_best.pt", "num_updates": 5, "passed_over": [
        {"name": "checkpoint_last.pt", "reason": "empty (0 bytes)"},
        {"name": "checkpoint_1_3.pt", "reason": f"truncated: {len(good) // 3} bytes, a torch.save archive without its "
                                                "end (the write was cut short)"},
    ]}
    assert f"training would pass over {checkpoints / 'checkpoint_last.pt'}: empty (0 bytes)" in err
    assert f"training would resume from {checkpoints / 'checkpoint_best.pt'} (5 updates)" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint_1_3.pt", "checkpoint_best.pt",
                                                             "checkpoint_last.pt"], "a dry run changes nothing"


def test_dry_run_says_when_nothing_loads(capsys, tmp_path, data_bin):
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "checkpoint_last.pt").write_bytes(b"")
    status, out, err = run(capsys, *train_argv(tmp_path, data_bin, checkpoints, "--dry-run"))
    assert status == 0 and json.loads(out)["resume"] == {
        "from": None, "num_updates": 0, "passed_over": [{"name": "checkpoint_last.pt", "reason": "empty (0 bytes)"}]}
    assert f"training would start from scratch (no checkpoint at {checkpoints} loads)" in err


def evaluate_argv(data_bin: Path, checkpoint: Path, out: Path) -> list:
    return ["evaluate", "--config", TINY_CONFIG, "--set", "evaluate.split=valid", "--set", "evaluate.other_splits=[]",
            "--data-bin", data_bin, "--checkpoint", checkpoint, "--out", out]


def test_evaluate_names_a_truncated_checkpoint(capsys, tmp_path, tiny_lm):
    checkpoint = tmp_path / "checkpoint_best.pt"
    checkpoint.write_bytes(tiny_lm.checkpoint.read_bytes()[:200_000])
    status, out, err = run(capsys, *evaluate_argv(tiny_lm.data_bin, checkpoint, tmp_path / "metrics.json"))
    assert status == 1 and one_line_error(err) == (
        f"cannot evaluate: checkpoint {checkpoint}: truncated: 200000 bytes, a torch.save archive without its end "
        "(the write was cut short); pass another checkpoint, or train again")
    assert out == "" and not (tmp_path / "metrics.json").exists()


def test_evaluate_names_a_damaged_split_and_dictionary_at_once(capsys, tmp_path, tiny_lm):
    data_bin = Path(shutil.copytree(tiny_lm.data_bin, tmp_path / "data-bin"))
    truncate(data_bin / "valid.bin", 64)
    (data_bin / "dict.txt").write_text((data_bin / "dict.txt").read_text() + "<s> 1\n")
    status, _, err = run(capsys, *evaluate_argv(data_bin, tiny_lm.checkpoint, tmp_path / "metrics.json"))
    line = one_line_error(err)
    assert status == 1 and line.startswith(f"cannot evaluate: {data_bin}/dict.txt lists a symbol twice: '<s>' (one "
                                           "of fairseq's specials) on line ")
    assert f"; {data_bin}/valid.bin is 64 bytes, but valid.idx describes " in line


def test_register_names_a_damaged_checkpoint_before_opening_a_tracking_run(capsys, tmp_path, tiny_lm):
    checkpoint = tmp_path / "checkpoint_best.pt"
    checkpoint.write_bytes(b"")
    root = tmp_path / "runs"
    status, _, err = run(capsys, "register", "--config", TINY_CONFIG, "--set", f"storage.root={root}",
                         "--data-bin", tiny_lm.data_bin, "--checkpoint", checkpoint)
    assert status == 1 and one_line_error(err) == (
        f"cannot register: checkpoint {checkpoint}: empty (0 bytes): its write never finished; "
        "pass another checkpoint, or train again")
    assert not root.exists(), "no MLflow database, no run"


def test_register_step_names_a_damaged_dictionary(tmp_path, tiny_lm):
    """The pipeline's register step calls register_model itself: the same check, before MLflow is asked anything."""
    from lmforge.errors import LmforgeError
    from lmforge.models.register import register_model

    dict_path = tmp_path / "dict.txt"
    dict_path.write_text(tiny_lm.dict_path.read_text() + "the 7\n")
    with pytest.raises(LmforgeError) as info:
        register_model(checkpoint=tiny_lm.checkpoint, dict_path=dict_path, model_name="lm", run_id="0" * 32,
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", tags={})
    assert str(info.value).startswith(f"cannot register: {dict_path} lists a symbol twice: 'the' on lines ")
    assert not (tmp_path / "mlflow.db").exists()
