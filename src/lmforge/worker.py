"""`python -m lmforge.worker`: one training process, as torchrun or a PyTorchJob
starts it (submitted PyTorchJob manifests name this module). The worker lives in
`lmforge.training.worker`."""

from lmforge.training.worker import main

if __name__ == "__main__":
    raise SystemExit(main())
