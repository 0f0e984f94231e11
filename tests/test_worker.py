import pytest

from lmforge.errors import LmforgeError
from lmforge.worker import placement_from_env

MASTER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_no_environment_is_a_single_process():
    placement = placement_from_env({}, cuda=False)
    assert (placement.world_size, placement.rank, placement.device_id) == (1, 0, 0)


def test_torchrun_environment():
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", **MASTER}
    placement = placement_from_env(env, cuda=True)
    assert (placement.world_size, placement.rank, placement.device_id, placement.cuda) == (4, 3, 1, True)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "2", "RANK": "2", **MASTER}, "outside WORLD_SIZE"),
        ({"WORLD_SIZE": "two"}, "not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
        ({"WORLD_SIZE": "0"}, ">= 1"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "1", **MASTER}, "LOCAL_RANK"),
    ],
)
def test_inconsistent_environment_is_refused(env, message):
    with pytest.raises(LmforgeError, match=message):
        placement_from_env(env, cuda=False)
