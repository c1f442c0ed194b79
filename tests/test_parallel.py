"""Distributed environment parsing (torchrun, SLURM) and layout validation."""

import json

import pytest

from megarlhf.config import ConfigError, ParallelConfig, check_layout, preset
from megarlhf.parallel import DistEnv, expand_slurm_nodelist
from tests.conftest import launch


def test_torchrun_environment():
    env = DistEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                "MASTER_ADDR": "node7", "MASTER_PORT": "29555"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) \
        == (3, 4, 1, "node7", 29555, "torchrun")


def test_slurm_environment_without_torchrun():
    env = DistEnv.from_environ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                                "SLURM_JOB_NODELIST": "gpu[003-004,010],login1",
                                "SLURM_JOB_ID": "123456"})
    assert env.source == "slurm"
    assert (env.rank, env.world_size, env.local_rank) == (9, 16, 1)
    assert env.master_addr == "gpu003"  # the first host of the allocation
    assert env.master_port == 10000 + 123456 % 20000  # below the ephemeral port range


def test_slurm_master_addr_and_port_can_be_given():
    env = DistEnv.from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                                "SLURM_JOB_NODELIST": "a1", "MASTER_ADDR": "10.0.0.1",
                                "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 1234)


def test_slurm_without_nodelist_is_an_error():
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST"):
        DistEnv.from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_torchrun_wins_over_slurm():
    env = DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5",
                                "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "x"})
    assert env.source == "torchrun" and env.world_size == 2


def test_single_process_default():
    env = DistEnv.from_environ({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single")


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),
    ("a[1,3],b2", ["a1", "a3", "b2"]),
    ("rack1-n[01-02,05]", ["rack1-n01", "rack1-n02", "rack1-n05"]),
    ("x[9-10]y", ["x9y", "x10y"]),
])
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def test_layout_errors_name_fields_and_values():
    m = preset("tiny")  # 8 heads, 2 KV heads, 4 layers, ffn 688
    with pytest.raises(ConfigError) as e:
        check_layout(m, ParallelConfig(tensor_model_parallel_size=4, pipeline_model_parallel_size=3), 8)
    msg = str(e.value)
    assert "world size 8 is not divisible by parallel.tensor_model_parallel_size=4 x " \
           "parallel.pipeline_model_parallel_size=3" in msg
    assert "model.num_query_groups=2 is not divisible by parallel.tensor_model_parallel_size=4" in msg
    assert "model.num_layers=4 is not divisible by parallel.pipeline_model_parallel_size=3" in msg
    assert len(e.value.problems) == 3


def test_layout_errors_virtual_pipeline_and_sequence_parallel():
    m = preset("tiny")
    with pytest.raises(ConfigError, match="needs parallel.pipeline_model_parallel_size > 1"):
        check_layout(m, ParallelConfig(virtual_pipeline_model_parallel_size=2))
    with pytest.raises(ConfigError, match=r"num_layers=4 is not divisible by .*virtual_pipeline"):
        check_layout(m, ParallelConfig(pipeline_model_parallel_size=2,
                                       virtual_pipeline_model_parallel_size=4))
    with pytest.raises(ConfigError, match="sequence_parallel=true needs"):
        check_layout(m, ParallelConfig(sequence_parallel=True))


def test_valid_layouts_pass():
    for tp, pp in [(1, 1), (2, 1), (2, 2), (1, 4)]:
        check_layout(preset("tiny"), ParallelConfig(tensor_model_parallel_size=tp,
                                                    pipeline_model_parallel_size=pp), 8)
    check_layout(preset("llama2-70b"), ParallelConfig(tensor_model_parallel_size=8,
                                                      pipeline_model_parallel_size=4), 64)


def test_data_parallel_size():
    par = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert par.data_parallel_size(16) == 4 and par.model_parallel_size == 4


@pytest.mark.parametrize("scoped", [True, False], ids=["scoped", "megatron_globals"])
def test_fp8_amax_reduction_spans_each_models_own_ranks(tmp_path, scoped):
    """Several layouts in one job (PPO's roles): while a model runs forward, megatron's
    FP8 amax-reduction group is its own layout's TP x DP ranks, not the whole job's (the
    reward model's ranks would never join the policy's reduction: a hang), and the
    globals are restored afterwards. Without the scoping the reduction spans the job."""
    out = tmp_path / "amax"
    launch("tests/amax_worker.py", 2, *(["--scoped"] if scoped else []), "--out", out)
    r = [json.loads((tmp_path / f"amax.rank{rank}.json").read_text()) for rank in (0, 1)]
    own = {"policy": [0], "scorer": [1]}
    for rank, role in ((0, "policy"), (1, "scorer")):
        seen = r[rank][role]["seen"]
        amax, tp_only = seen[0], seen[1]
        if scoped:
            assert amax == {"tp_only": False, "ranks": own[role], "sum": 1.0}
            assert tp_only == {"tp_only": True, "ranks": own[role], "sum": 1.0}
        else:
            assert amax["ranks"] == [0, 1]  # the whole job: on a GPU the scorer never joins
        assert r[rank][role]["after"] == [0, 1]  # megatron's own layout again
    for rank in (0, 1):
        shared = r[rank]["shared"]["seen"]
        assert shared[0] == {"tp_only": False, "ranks": [0, 1], "sum": 2.0}
        assert shared[1]["ranks"] == ([0, 1] if scoped else [rank])


def test_ranks_of_the_local_launcher_say_so():
    env = DistEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "MEGARLHF_LAUNCHER": "local"})
    assert (env.rank, env.world_size, env.source) == (1, 2, "local")
