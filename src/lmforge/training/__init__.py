"""Training: the train stage (preflight, launch, summary), the worker that runs fairseq in each
process, checkpoints in storage, the launchers (local torchrun, Kubeflow PyTorchJob) and the
distributed-environment contract they share.

    train.py         the train stage            lmforge train --config tiny.yaml --data-bin DIR --checkpoints DIR
    worker.py        one training process       python -m lmforge.worker --config run.json --data DIR --save-dir URI
    distributed.py   torchrun's and the Training Operator's variables, what they mean, what each process gets
    checkpoints.py   checkpoints between a worker's disk and the checkpoint location
    launchers/       how the workers start: local.py (this machine), containers.py (an emulated
                     PyTorchJob's replicas as containers), pytorchjob.py (a cluster; its
                     Kubernetes API errors and back-off in k8s_api.py)
"""
