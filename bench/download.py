"""bench/download: lmforge's HTTP fetch against curl on the same file from the same local server.

Builds a ~50 MB text file by repeating the WikiText-2 sample (../shared/data),
serves it from an HTTP server in a separate process on 127.0.0.1 (sendfile, so
the server is not the bottleneck), then downloads it several rounds with
  1. `lmforge.io.transfer.fetch` (streamed, sha256 while streaming, resumable,
     temporary name, pin check, rename), and
  2. `/usr/bin/curl -s -o FILE URL`, and
  3. the same curl followed by `sha256sum FILE` (what lmforge's pin check does),
rotating which goes first, and prints each one's MB/s (median and best) and
the ratios lmforge / curl and lmforge / (curl + sha256sum).

    .venv/bin/python bench/download.py [--mb 50] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "wikitext-2"
CURL = "/usr/bin/curl"
SHA256SUM = "/usr/bin/sha256sum"


def serve(path: Path, port: int) -> None:
    """Serve `path` at /corpus.txt until killed (runs in its own process)."""
    size = path.stat().st_size

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path != "/corpus.txt":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.flush()
            with open(path, "rb") as f:
                self.connection.sendfile(f)

        def log_message(self, *args) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def build_file(dest: Path, mb: int) -> str:
    if not (DATA / "valid.txt").is_file():
        sys.exit(f"WikiText-2 sample not found at {DATA} (see shared/data/README.md)")
    text = (DATA / "valid.txt").read_bytes() + (DATA / "test.txt").read_bytes()
    digest = hashlib.sha256()
    with open(dest, "wb") as f:
        written = 0
        while written < mb * 1_000_000:
            f.write(text)
            digest.update(text)
            written += len(text)
    return digest.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit("the bench server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50, help="file size in MB (default 50)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--serve", nargs=2, metavar=("FILE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]))
        return

    sys.path.insert(0, str(REPO / "src"))
    from lmforge.io.transfer import fetch

    with tempfile.TemporaryDirectory(prefix="lmforge-bench-download-") as tmp:
        tmp_path = Path(tmp)
        src = tmp_path / "corpus.txt"
        pin = build_file(src, args.mb)
        size = src.stat().st_size
        port = free_port()
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(src), str(port)])
        try:
            wait_for(port)
            url = f"http://127.0.0.1:{port}/corpus.txt"

            def ours() -> float:
                out = tmp_path / "ours.txt"
                t0 = time.perf_counter()
                digest, n = fetch(url, out, sha256=pin, size=size, retries=1)
                elapsed = time.perf_counter() - t0
                assert (digest, n) == (pin, size)
                out.unlink()
                return elapsed

            def curl() -> float:
                out = tmp_path / "curl.txt"
                t0 = time.perf_counter()
                subprocess.run([CURL, "-s", "-o", str(out), url], check=True)
                elapsed = time.perf_counter() - t0
                assert out.stat().st_size == size
                out.unlink()
                return elapsed

            def curl_verified() -> float:
                # The like-for-like peer: lmforge verifies a pin, so curl + sha256sum.
                out = tmp_path / "curl.txt"
                t0 = time.perf_counter()
                subprocess.run([CURL, "-s", "-o", str(out), url], check=True)
                digest = subprocess.run([SHA256SUM, str(out)], check=True, capture_output=True, text=True).stdout.split()[0]
                elapsed = time.perf_counter() - t0
                assert digest == pin
                out.unlink()
                return elapsed

            runners = [("lmforge", ours), ("curl", curl)]
            if Path(SHA256SUM).is_file():
                runners.append(("curl+sha256sum", curl_verified))
            for _, fn in runners:
                fn()  # warm the page cache and every code path
            times: dict[str, list[float]] = {name: [] for name, _ in runners}
            for r in range(args.rounds):
                # Rotate the order so neither side always runs right after the other.
                for name, fn in runners[r % len(runners) :] + runners[: r % len(runners)]:
                    times[name].append(fn())
        finally:
            server.terminate()
            server.wait()

    mb = size / 1e6
    rate = {name: [mb / t for t in ts] for name, ts in times.items()}
    print(f"file: {mb:.1f} MB from 127.0.0.1, {args.rounds} rounds (after one warm-up each), {os.cpu_count()} CPUs")
    for name, rs in rate.items():
        print(
            f"{name:15s} median {statistics.median(rs):7.1f} MB/s   best {max(rs):7.1f} MB/s"
            f"   all {', '.join(f'{x:.0f}' for x in rs)}"
        )
    for peer in rate:
        if peer != "lmforge":
            ratio = statistics.median(rate["lmforge"]) / statistics.median(rate[peer])
            print(f"ratio lmforge/{peer} (median MB/s): {ratio:.2f}")
    print("(lmforge computes sha256 while streaming and checks the pin; plain curl does not hash)")


if __name__ == "__main__":
    main()
