"""How training processes are started: every launcher runs `lmforge.worker` with the same
contract (`lmforge.training.distributed`). In: the run config and the worker's arguments; out:
training run to its end, or an LmforgeError saying why not. `local` starts the processes on this
machine (an emulated PyTorchJob's replicas as processes, or as containers under `containers`'
supervisor: train.local_replicas), `pytorchjob` on a Kubeflow cluster; `lmforge train` picks one
by `train.launcher`."""
