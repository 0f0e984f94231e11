import sys

from lmforge.launchers.local import torchrun_command


def test_torchrun_command_runs_the_worker_module_with_nproc():
    command = torchrun_command(2, ["--config", "c.json"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[command.index("--nproc-per-node") + 1] == "2"
    assert "--standalone" in command
    assert command[-4:] == ["-m", "lmforge.worker", "--config", "c.json"]
