"""`python -m lmforge.worker`: one training process, as torchrun or a PyTorchJob starts it
(submitted PyTorchJob manifests and the local launcher name this module).

In: the worker's arguments (--config, --data, --save-dir, ...) and the distributed variables;
out: its exit status. Everything lives in `lmforge.training.worker`; this is its entry point at
the old path.

    python -m lmforge.worker --config run.json --data DIR --save-dir URI
"""

from lmforge.training.worker import main

if __name__ == "__main__":
    raise SystemExit(main())
