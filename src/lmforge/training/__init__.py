"""Training: the train stage (preflight, launch, summary), the worker that runs
fairseq in each process, checkpoints in storage, the launchers (local torchrun,
Kubeflow PyTorchJob) and the distributed-environment contract they share."""
