"""bench/evaluate: lmforge's evaluation against fairseq-eval-lm, and the served model's latency.

In one run of this script, on the same checkpoint and data:
  1. eval-lm throughput: `lmforge evaluate` (the evaluate stage: fairseq's eval-lm code in
     process, plus the evaluation identity's hashing) against `fairseq-eval-lm` with the very
     argument list lmforge builds (`lmforge.tasks.language_modeling` eval_args), alternating which goes first;
     prints wall times, the scoring loop's tokens/s as each reports it, and the ratios;
  2. serving: the checkpoint registered with `lmforge.models.register` (SQLite store), served by
     `mlflow models serve --env-manager local` on 127.0.0.1; prints the latency of one
     /invocations request scoring one short text (median, p90), against fairseq's hub
     `score()` of the same text in process (the peer: the model without HTTP and MLflow).

The checkpoint is the tiny config's transformer after a few updates on WikiText-2 (the
weights do not change the cost of scoring).

    .venv/bin/python bench/evaluate.py [--rounds 3] [--requests 50] [--config pipelines/configs/tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_corpus  # noqa: E402  (the tests' corpus builder: the same text)

from lmforge import config  # noqa: E402
from lmforge.fairseq_api.arguments import train_args  # noqa: E402
from lmforge.tasks.language_modeling import TASK as LM  # noqa: E402

BIN = Path(sys.executable).parent
TEXT = "the album was released in the united states on 12 may 2009 ."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(cfg: config.RunConfig, work: Path) -> tuple[Path, Path]:
    corpus = write_corpus(work / "corpus", train_lines=600)
    data, ckpt = work / "data-bin", work / "checkpoints"
    subprocess.run(
        [BIN / "fairseq-preprocess", "--only-source", "--trainpref", corpus / "train.txt", "--validpref",
         corpus / "valid.txt", "--testpref", corpus / "test.txt", "--destdir", data, "--thresholdsrc",
         str(cfg.preprocess.threshold), "--workers", "1"],
        check=True, capture_output=True,
    )
    args = train_args(cfg, str(data), str(ckpt))
    subprocess.run([BIN / "fairseq-train", *args, "--max-update", "5", "--num-workers", "0"], check=True, capture_output=True)
    return data, ckpt / "checkpoint_last.pt"


def fairseq_run(argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, tokens/s fairseq reports, loss) of one fairseq-eval-lm process."""
    started = time.perf_counter()
    out = subprocess.run([BIN / "fairseq-eval-lm", *argv], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = out.stdout + out.stderr
    rate = float(re.search(r"\(([\d.]+) tokens/s\)", log).group(1))
    loss = float(re.search(r"Loss \(base 2\): ([\d.]+)", log).group(1))
    return wall, rate, loss


def lmforge_run(config_path: Path, overrides: list[str], data: Path, ckpt: Path) -> tuple[float, float, float]:
    started = time.perf_counter()
    out = subprocess.run(
        [BIN / "lmforge", "evaluate", "--config", config_path, *[a for o in overrides for a in ("--set", o)],
         "--data-bin", data, "--checkpoint", ckpt],
        check=True, capture_output=True, text=True,
    )
    wall = time.perf_counter() - started
    result = json.loads(out.stdout[out.stdout.index("{"):])
    return wall, result["tokens_per_second"], result["loss_base2"], result["tokens"]


def bench_eval(cfg, config_path, overrides, data, ckpt, rounds: int) -> None:
    argv = LM.eval_args(cfg, str(data), str(ckpt))
    ours, theirs = [], []
    for i in range(rounds):
        pair = [lambda: ours.append(lmforge_run(config_path, overrides, data, ckpt)), lambda: theirs.append(fairseq_run(argv))]
        for run in pair if i % 2 == 0 else reversed(pair):
            run()
    tokens = ours[0][3]
    o_wall, t_wall = statistics.median(r[0] for r in ours), statistics.median(r[0] for r in theirs)
    o_rate, t_rate = statistics.median(r[1] for r in ours), statistics.median(r[1] for r in theirs)
    print(f"eval-lm on CPU, split test ({tokens} tokens), {rounds} rounds, medians:")
    print(f"  lmforge evaluate   wall {o_wall:6.2f} s   scoring {o_rate:9.1f} tokens/s   loss {ours[0][2]:.4f}")
    print(f"  fairseq-eval-lm    wall {t_wall:6.2f} s   scoring {t_rate:9.1f} tokens/s   loss {theirs[0][2]:.4f}")
    print(f"  throughput ratio lmforge/fairseq: scoring {o_rate / t_rate:.3f}, end to end {t_wall / o_wall:.3f}")


def bench_serving(data: Path, ckpt: Path, work: Path, requests: int) -> None:
    from mlflow import MlflowClient

    from lmforge.models.register import register_model

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench", artifact_location=(work / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    evaluation = {"split": "test", "perplexity": 1.0, "identity": {"split": "test"}, "identity_sha256": "0" * 64}
    register_model(checkpoint=ckpt, dict_path=data / "dict.txt", model_name="bench-lm", tracking_uri=uri,
                   run_id=run_id, tags={}, evaluation=evaluation)

    port, log = free_port(), work / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [BIN / "mlflow", "models", "serve", "-m", "models:/bench-lm@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        started = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow models serve exited:\n{log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        startup = time.perf_counter() - started
        body = json.dumps({"inputs": [TEXT]}).encode()
        latencies = []
        for _ in range(requests + 3):  # the first few warm the process up
            request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as response:
                response.read()
            latencies.append(time.perf_counter() - t0)
        latencies = sorted(latencies[3:])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

    from fairseq.models.transformer_lm import TransformerLanguageModel

    hub = TransformerLanguageModel.from_pretrained(str(ckpt.parent), ckpt.name, data_name_or_path=str(data)).eval()
    hub.score(TEXT)
    peer = []
    for _ in range(requests):
        t0 = time.perf_counter()
        hub.score(TEXT)
        peer.append(time.perf_counter() - t0)
    peer.sort()
    med, p90 = statistics.median(latencies), latencies[int(0.9 * (len(latencies) - 1))]
    print(f"serving one short text ({len(TEXT.split())} words), {requests} requests, server up in {startup:.1f} s:")
    print(f"  mlflow models serve /invocations  median {med * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms")
    print(f"  fairseq hub score() in process    median {statistics.median(peer) * 1000:7.1f} ms")
    print(f"  latency ratio served/hub: {med / statistics.median(peer):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "pipelines" / "configs" / "tiny.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    overrides = ["evaluate.other_splits=[]"]  # the test split only, as fairseq-eval-lm scores it
    cfg = config.load(args.config, overrides)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-eval-") as tmp:
        work = Path(tmp)
        data, ckpt = prepare(cfg, work)
        bench_eval(cfg, args.config, overrides, data, ckpt, args.rounds)
        bench_serving(data, ckpt, work, args.requests)


if __name__ == "__main__":
    main()
