"""The train stage for real: torchrun with 2 CPU processes over gloo, an emulated 2-node
PyTorchJob reading its data-bin from S3 (moto's server on 127.0.0.1), the dry run, and the
checks that stop a bad run before launch."""

import json
import math
import shutil
import subprocess
import sys
import uuid

import pytest

from conftest import FAST_TRAINING, TINY_CONFIG
from lmforge import config, steps
from lmforge.io import storage
from lmforge.errors import ConfigError, LmforgeError
from lmforge.training.train import preflight, train


def test_training_writes_best_and_last_checkpoints(trained_checkpoints):
    save_dir, summary = trained_checkpoints
    assert summary["num_updates"] == 12
    assert (save_dir / "checkpoint_best.pt").is_file() and (save_dir / "checkpoint_last.pt").is_file()
    assert summary["best_valid_loss"] is not None and summary["best_valid_loss"] > 0
    assert not list(save_dir.glob("checkpoint[0-9]*.pt")), "only best and last are kept"


def test_two_processes_trained_together(trained_checkpoints):
    import torch

    save_dir, _ = trained_checkpoints
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["cfg"]["distributed_training"]["distributed_world_size"] == 2


@pytest.mark.parametrize(("nproc", "max_update"), [(1, 16), (2, 14)], ids=["one-process", "two-processes"])
def test_rerun_resumes_from_last_checkpoint(nproc, max_update, trained_checkpoints, small_data_bin, tmp_path, capfd):
    """With two processes rank 0 reads the checkpoint and fairseq sends its state to rank 1
    (broadcast_object: torch.save, then torch.load, which refuses fairseq's omegaconf config under
    torch's weights_only default)."""
    save_dir, _ = trained_checkpoints
    resumed_dir = tmp_path / "checkpoints"
    shutil.copytree(save_dir, resumed_dir)
    # no validation (120k tokens here): checkpoint_best.pt stays the one recorded by the first run
    cfg = config.load(TINY_CONFIG, [f"train.max_update={max_update}", "train.max_epoch=0", f"train.nproc={nproc}",
                                    f"train.cache_dir={tmp_path / 'cache'}", "train.extra_args.disable_validation=true"])
    capfd.readouterr()
    summary = train(cfg, small_data_bin, resumed_dir)
    output = "".join(capfd.readouterr())  # the worker processes' own log lines
    assert summary["num_updates"] == max_update
    # fairseq says where it restarted from; a fresh start would say it found no checkpoint
    assert "@ 12 updates)" in output and "Loaded checkpoint" in output
    assert "Weights only load failed" not in output


def test_missing_dictionary_is_a_user_error(tmp_path):
    cfg = config.load(TINY_CONFIG)
    with pytest.raises(LmforgeError, match="dict.txt"):
        train(cfg, tmp_path, tmp_path / "ckpt")


def test_emulated_two_node_pytorchjob_trains_from_s3_into_one_mlflow_run(
    fast_data_bin, moto_s3, tmp_path, monkeypatch
):
    """The local launcher runs 2 replicas x 1 process with the operator's variables, each with its
    own cache (its "node disk"); the data-bin is on S3, so each node copies it once; checkpoints go
    to S3 and load; the pipeline run has one MLflow run, whose training metrics come from rank 0 only."""
    import boto3
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts of an experiment without a location in ./mlruns
    bucket = f"train-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=bucket)
    data_bin = f"s3://{bucket}/data/data-bin"
    storage.put_dir(fast_data_bin, data_bin, endpoint_url=moto_s3)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "manifest.json").write_text(json.dumps({"sha256": "0" * 64, "splits": {}}))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config.load(TINY_CONFIG, [
        *FAST_TRAINING, "train.nnodes=2", "train.max_update=6", f"train.cache_dir={tmp_path / 'cache'}",
        f"storage.root=s3://{bucket}/runs", f"storage.s3_endpoint={moto_s3}", f"tracking.uri={tracking}",
    ])

    best = steps.train(cfg.to_json(), "run-1", str(corpus), data_bin)

    assert best == f"s3://{bucket}/runs/tiny/run-1/checkpoints/checkpoint_best.pt"
    for node in (0, 1):
        (copy,) = [p for p in (tmp_path / "cache" / f"node-{node}" / "data-bin").iterdir() if p.is_dir()]
        assert (copy / "dict.txt").read_bytes() == (fast_data_bin / "dict.txt").read_bytes()
    local = tmp_path / "best.pt"
    storage.get_file(best, local, endpoint_url=moto_s3)
    from fairseq import checkpoint_utils

    models, model_cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(local)], arg_overrides={"data": str(fast_data_bin)})
    assert models and model_cfg.distributed_training.distributed_world_size == 2

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([experiment.experiment_id])  # exactly one run for the pipeline run
    assert run.data.tags["lmforge.pipeline_run_id"] == "run-1"
    steps_logged = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert sorted(steps_logged) == [1, 2, 3, 4, 5, 6], "one value per update: rank 1 logged nothing"
    assert run.data.metrics["num_updates"] == 6
    assert run.data.tags["lmforge.checkpoints"] == f"s3://{bucket}/runs/tiny/run-1/checkpoints"


def test_dry_run_counts_an_epoch_as_fairseq_does_and_runs_one_batch(interval_run, fast_data_bin, tmp_path):
    """`lmforge train --dry-run`: the updates per epoch it estimates are those of the real run in
    `interval_run` (whose progress lines give the epoch fraction of one update)."""
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "train", "--config", str(TINY_CONFIG), "--data-bin", str(fast_data_bin),
         "--checkpoints", str(tmp_path / "ckpt"), "--dry-run",
         *[f"--set={s}" for s in (*FAST_TRAINING, "train.max_update=12", f"train.cache_dir={tmp_path}")]],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    first = next(line for line in interval_run["log"].splitlines() if "| train_inner |" in line)
    fraction = float(json.loads(first.split("| train_inner |", 1)[1])["update"])
    assert fraction == round(1 / report["updates_per_epoch"], 3)
    assert report["tokens_per_update"] <= report["max_tokens_per_update"] == 1024
    assert report["epochs_for_max_update"] == round(12 / report["updates_per_epoch"], 2)
    batch = report["batch"]
    assert 0 < batch["tokens"] <= 1024 and math.isfinite(batch["loss_base2"]) and batch["loss_base2"] > 1
    assert not (tmp_path / "ckpt").exists(), "a dry run saves nothing"
    # the model as built: 64 wide throughout (tests/fairseq_api/test_model_shapes.py counts its parameters)
    from fairseq.data import Dictionary

    words = len(Dictionary.load(str(fast_data_bin / "dict.txt")))
    assert report["model"] == {
        "embed_tokens": [words, 64], "layers": 2, "projections": [],
        "widths": {"embed_dim": 64, "input_dim": 64, "output_dim": 64, "ffn_dim": 256, "attention_heads": 2},
    }
    assert words * 64 < report["parameters"] < words * 64 + 200_000


def test_invalid_combinations_fail_before_launch():
    with pytest.raises(ConfigError) as info:
        config.load(TINY_CONFIG, ["model.criterion=adaptive_loss", "train.extra_args.ddp_backend=pytorch_ddp"])
    assert "adaptive_loss under DDP needs legacy_ddp" in str(info.value)
    assert "needs an adaptive softmax" in str(info.value)
    with pytest.raises(ConfigError, match="BMUF"):
        config.load(TINY_CONFIG, ["train.bmuf=true", "train.nproc=1"])
    with pytest.raises(ConfigError, match=r"train\.extra_args\.distributed_rank: set by the launcher"):
        config.load(TINY_CONFIG, ["train.extra_args.distributed_rank=3"])
    with pytest.raises(ConfigError, match="gpus_per_node"):
        config.load(TINY_CONFIG, ["train.launcher=pytorchjob", "train.pytorchjob.gpus_per_node=1"])


def test_preflight_checks_data_and_machine(fast_data_bin, tmp_path):
    too_big = config.load(TINY_CONFIG, ["model.preset=lstm_lm", "model.options.adaptive_softmax_cutoff=1000,5000"])
    with pytest.raises(LmforgeError, match=r"5000 exceeds the vocabulary of \d+ symbols"):
        preflight(too_big, str(fast_data_bin), str(tmp_path))
    # an adaptive input (fairseq asserts its cutoffs after launch); tied, only the softmax is named
    untied_input = config.load(TINY_CONFIG, ["model.options.adaptive_input=true", "model.options.adaptive_input_cutoff=500,5000"])
    with pytest.raises(LmforgeError, match=r"cannot train: model.options.adaptive_input_cutoff: 500,5000 exceeds"):
        preflight(untied_input, str(fast_data_bin), str(tmp_path))
    with pytest.raises(LmforgeError) as info:
        preflight(config.load(TINY_CONFIG, ["model.preset=transformer_lm_wiki103", "model.arch=transformer_lm_wiki103",
                                            "model.criterion=adaptive_loss"]), str(fast_data_bin), str(tmp_path))
    assert "adaptive_softmax_cutoff: 20000,60000 exceeds" in str(info.value)
    assert "adaptive_input_cutoff" not in str(info.value)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(LmforgeError, match="bf16 needs a GPU"):
            preflight(config.load(TINY_CONFIG, ["train.precision=bf16"]), str(fast_data_bin), str(tmp_path))
    on_cluster = config.load(TINY_CONFIG, ["train.launcher=pytorchjob", "train.pytorchjob.gpus_per_node=0"])
    with pytest.raises(LmforgeError, match="pytorchjob pods cannot read the local data-bin"):
        preflight(on_cluster, str(fast_data_bin), "s3://b/ckpt")
    no_valid = tmp_path / "data-bin"
    shutil.copytree(fast_data_bin, no_valid)
    (no_valid / "valid.bin").unlink()
    with pytest.raises(LmforgeError, match="no valid.bin"):
        preflight(config.load(TINY_CONFIG), str(no_valid), str(tmp_path))
