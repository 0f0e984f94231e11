"""bench/e2e: the overhead of lmforge's pipeline over running fairseq's CLIs by hand.

Runs the tiny config twice on the same corpus, in one run of this script:
  1. `lmforge run` (KFP local runner, MLflow tracking, registry), and
  2. the same work by hand: fairseq-preprocess, fairseq-train as 2 processes
     (one per rank, as torchrun would start them) and fairseq-eval-lm,
then prints both wall times, both perplexities and the overhead ratio.

    .venv/bin/python bench/e2e.py [--epochs N] [--train-lines N]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import write_corpus  # noqa: E402  (the tests' corpus builder, so bench and tests use the same text)

from lmforge import config  # noqa: E402
from lmforge.fairseq_api.arguments import Placement, train_args  # noqa: E402
from lmforge.tasks.language_modeling import TASK as LM  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def by_hand(cfg: config.RunConfig, corpus: Path, work: Path) -> float:
    data, ckpt = work / "data-bin", work / "checkpoints"
    p = cfg.preprocess
    subprocess.run(
        [BIN / "fairseq-preprocess", "--only-source", "--trainpref", corpus / "train.txt",
         "--validpref", corpus / "valid.txt", "--testpref", corpus / "test.txt", "--destdir", data,
         "--thresholdsrc", str(p.threshold), "--nwordssrc", str(p.nwords), "--padding-factor", str(p.padding_factor),
         "--workers", str(p.workers)],
        check=True, capture_output=True,
    )
    nproc = cfg.train.nproc
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(nproc),
           "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [BIN / "fairseq-train", *train_args(cfg, str(data), str(ckpt), Placement(world_size=nproc, rank=rank))],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for rank in range(nproc)
    ]
    if any(proc.wait() != 0 for proc in procs):
        raise SystemExit("fairseq-train failed")
    out = subprocess.run(
        [BIN / "fairseq-eval-lm", *LM.eval_args(cfg, str(data), str(ckpt / "checkpoint_best.pt"))],
        check=True, capture_output=True, text=True,
    )
    return float(re.search(r"Perplexity: ([0-9.]+)", out.stdout + out.stderr).group(1))


def with_lmforge(config_path: Path, overrides: list[str], corpus: Path, root: Path) -> float:
    result = subprocess.run(
        [BIN / "lmforge", "run", "--config", config_path, "--corpus", corpus, "--set", f"storage.root={root}",
         *[arg for o in overrides for arg in ("--set", o)]],
        check=True, capture_output=True, text=True,
    )
    return float(re.search(r"test perplexity: ([0-9.]+)", result.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-lines", type=int, default=None, help="lines of training text (default: all)")
    args = parser.parse_args()
    config_path = REPO / "pipelines" / "configs" / "tiny.yaml"
    overrides = [f"train.max_epoch={args.epochs}"]
    cfg = config.load(config_path, overrides)
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        tmp = Path(tmp)
        corpus = write_corpus(tmp / "corpus", train_lines=args.train_lines)
        lm_s, lm_ppl = timed(lambda: with_lmforge(config_path, overrides, corpus, tmp / "runs"))
        fs_s, fs_ppl = timed(lambda: by_hand(cfg, corpus, tmp / "by-hand"))
    print(f"tiny config, {args.epochs} epochs, {cfg.train.nproc} CPU processes")
    print(f"fairseq CLIs by hand : {fs_s:8.1f} s   test perplexity {fs_ppl:.2f}")
    print(f"lmforge run          : {lm_s:8.1f} s   test perplexity {lm_ppl:.2f}")
    print(f"overhead ratio       : {lm_s / fs_s:8.2f}x  (lmforge / fairseq by hand)")


if __name__ == "__main__":
    main()
