"""bench/gpu_train: the transformer_lm_gpt preset (GPT-2 small shape) on one GPU, fp16 against bf16.

Builds a synthetic corpus (Zipf-distributed words over a 32k vocabulary, so the embedding and
softmax have GPT-2-like sizes; the machine the benchmark runs on need not reach any data),
preprocesses it with lmforge, then trains a few hundred updates per precision with lmforge's
own argument builder and fairseq entry point (one process per precision, so nothing carries
over). For each precision it prints tokens/s (updates after the warm-up), model FLOPs
utilisation against the 790 TFLOP/s bf16 dense matmul rate measured on an H200, and peak GPU
memory; then the bf16 / fp16 ratios.

FLOPs per token: 6 x parameters (forward and backward of every weight, the tied output
projection included) + 12 x layers x width x context (attention scores and values).

    python bench/gpu_train.py [--updates 300] [--max-tokens 16384] [--precisions fp16 bf16]
    python bench/gpu_train.py --smoke     # CPU, tiny preset, 4 updates: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 790.0  # bf16 dense matmul, measured on the lent H200 (fp16 peaks the same on Hopper)


def synthetic_corpus(dest: Path, *, train_tokens: int, vocab: int, seed: int = 1) -> Path:
    """train/valid/test text of Zipf-distributed words, ~12 words a line."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(vocab)])
    dest.mkdir(parents=True, exist_ok=True)
    for split, tokens in (("train", train_tokens), ("valid", max(train_tokens // 100, 20_000)),
                          ("test", max(train_tokens // 100, 20_000))):
        ids = np.minimum(rng.zipf(1.1, size=tokens) - 1, vocab - 1)
        lines = [" ".join(words[ids[i:i + 12]]) for i in range(0, tokens, 12)]
        (dest / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def child(args: argparse.Namespace) -> None:
    """One precision: train, then print one JSON line with the measurements."""
    import torch

    from lmforge import config, fairseq_api
    from lmforge.fairseq_api.arguments import Placement, train_args

    cuda = args.device == "cuda"
    cfg = config.from_dict({
        "corpus": {"source": "synthetic"},
        "model": {"preset": args.preset},
        "train": {"nproc": 1, "max_update": args.updates, "max_epoch": 0, "max_tokens": args.max_tokens,
                  "precision": args.precision, "log_interval": args.log_interval, "warmup_updates": 50,
                  "extra_args": {"disable_validation": True, "no_save": True, "num_workers": 2}},
    })
    stats: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.name == "train_inner":
                stats.append(json.loads(record.getMessage()))

    logging.getLogger("fairseq.logging.progress_bar").addHandler(Collect())
    with tempfile.TemporaryDirectory() as save_dir:
        argv = train_args(cfg, args.data_bin, save_dir, Placement(cuda=cuda))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fairseq_api.train(argv)
    measured = [s for s in stats if int(s["num_updates"]) > args.warmup] or stats
    tokens_per_s = sum(float(s["wps"]) for s in measured) / max(len(measured), 1)
    dims = _model_dims(cfg)
    print("RESULT " + json.dumps({
        "precision": args.precision, "tokens_per_s": tokens_per_s, **dims,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "intervals": len(measured), "last_loss": float(stats[-1]["loss"]) if stats else None,
    }), flush=True)


def _model_dims(cfg) -> dict:
    """Parameters and shape of the preset's model, from fairseq's own architecture defaults."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    ns = argparse.Namespace(**{k: v for k, v in cfg.model.options.items()})
    ARCH_CONFIG_REGISTRY[cfg.model.arch](ns)
    layers, width = int(ns.decoder_layers), int(ns.decoder_embed_dim)
    return {"layers": layers, "width": width, "ffn": int(ns.decoder_ffn_embed_dim),
            "context": cfg.train.tokens_per_sample}


def flops_per_token(params: int, layers: int, width: int, context: int) -> float:
    return 6.0 * params + 12.0 * layers * width * context


def parameter_count(data_bin: str, preset: str) -> int:
    """Parameters of the preset's model for this dictionary (built on the CPU, not trained)."""
    from fairseq import options, tasks

    from lmforge import config
    from lmforge.fairseq_api.arguments import Placement, train_args

    cfg = config.from_dict({"corpus": {"source": "synthetic"}, "model": {"preset": preset}})
    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, input_args=train_args(cfg, data_bin, "/tmp", Placement()))
    task = tasks.setup_task(ns)
    return sum(p.numel() for p in task.build_model(ns).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50, help="updates left out of the tokens/s average")
    parser.add_argument("--max-tokens", type=int, default=16384, help="tokens per batch (16 sequences of 1024)")
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"])
    parser.add_argument("--preset", default="transformer_lm_gpt")
    parser.add_argument("--train-tokens", type=int, default=6_000_000)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny preset on the CPU for 4 updates")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--data-bin", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.device, args.preset, args.updates, args.warmup = "cpu", "tiny", 4, 0
        args.precisions, args.max_tokens, args.train_tokens, args.vocab, args.log_interval = ["fp32"], 1024, 60_000, 2_000, 1
    if args.child:
        child(args)
        return

    from lmforge.data.preprocess import preprocess

    with tempfile.TemporaryDirectory(prefix="gpu-train-") as tmp:
        corpus = synthetic_corpus(Path(tmp) / "corpus", train_tokens=args.train_tokens, vocab=args.vocab)
        data_bin = Path(tmp) / "data-bin"
        preprocess(corpus, data_bin, workers=min(8, os.cpu_count() or 1))
        params = parameter_count(str(data_bin), args.preset)
        results = {}
        for precision in args.precisions:
            command = [sys.executable, __file__, "--child", "--precision", precision, "--data-bin", str(data_bin),
                       "--preset", args.preset, "--updates", str(args.updates), "--warmup", str(args.warmup),
                       "--max-tokens", str(args.max_tokens), "--device", args.device,
                       "--log-interval", str(args.log_interval)]
            proc = subprocess.run(command, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{precision}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
                continue
            result = json.loads(line[len("RESULT "):])
            flops = flops_per_token(params, result["layers"], result["width"], result["context"])
            result["mfu"] = result["tokens_per_s"] * flops / (PEAK_TFLOPS * 1e12)
            results[precision] = result
            memory = f"{result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else "n/a (CPU)"
            print(f"{args.preset} {precision}: {result['tokens_per_s']:,.0f} tokens/s, MFU {100 * result['mfu']:.1f}% "
                  f"of {PEAK_TFLOPS:.0f} TFLOP/s, peak memory {memory}, {params / 1e6:.1f}M parameters, "
                  f"loss {result['last_loss']} after {args.updates} updates")
        if "fp16" in results and "bf16" in results:
            print(f"bf16 / fp16: tokens/s x{results['bf16']['tokens_per_s'] / results['fp16']['tokens_per_s']:.2f}, "
                  f"peak memory x{results['bf16']['peak_memory_gib'] / results['fp16']['peak_memory_gib']:.2f}")
        print(json.dumps({"parameters": params, "results": results}))


if __name__ == "__main__":
    main()
