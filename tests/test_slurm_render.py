"""sbatch scripts rendered from configs against golden files, and the checks that reject a job
before it reaches Slurm. No cluster needed.

    KVRELAY_UPDATE_GOLDEN=1 python -m pytest tests/test_slurm_render.py   # rewrite the golden files
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import submitit

from kvrelay.configs.schema import ConfigError, load_config
from kvrelay.slurm.resources import check_cluster, parse_sinfo, placement
from kvrelay.slurm.sbatch import render
from kvrelay.slurm.submitit_job import parameters

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "golden"
DEMO = str(REPO / "configs" / "demo.yaml")
PATHS = {"input.path": "/data/prompts.jsonl", "output.path": "/scratch/run1/out.jsonl", "model.path": "/models/llama-8b"}

ONE_NODE = ["slurm.partition=cpu", "slurm.account=proj42", "slurm.python=/opt/kvrelay/bin/python",
            "slurm.setup=[module load gcc/12, source /opt/kvrelay/bin/activate]"]
MULTI_NODE = ["job.device=cuda", "roles.prefill=2", "roles.decode=6", "slurm.nodes=2", "slurm.gpus_per_node=4",
              "slurm.partition=gpu", "slurm.time=1-00:00:00", "slurm.cpus_per_task=8", "slurm.mem=400G",
              "slurm.constraint=h100", "slurm.srun_mpi=pmix", "slurm.sbatch_options=[--exclusive]",
              "slurm.python=/opt/kvrelay/bin/python", "slurm.setup=[module load cuda/12.4 openmpi/5]"]


def rendered(overrides: list[str], array: int | None = None) -> str:
    cfg = load_config(DEMO, overrides, **PATHS)
    return render(cfg, DEMO, overrides, array).replace(str(REPO), "/repo")


@pytest.mark.parametrize(
    "name,overrides,array",
    [
        ("one_node.sbatch", ONE_NODE, None),
        ("multi_node.sbatch", MULTI_NODE, None),
        ("multi_node_mpirun.sbatch", [*MULTI_NODE, "slurm.launcher=mpirun", "slurm.mpirun=mpirun --bind-to none"], None),
        ("array.sbatch", ONE_NODE, 8),
        ("multi_node_tp2.sbatch", [*MULTI_NODE, "roles.prefill=1", "roles.decode=3", "roles.tp=2"], None),
        ("multi_node_tp4.sbatch", [*MULTI_NODE, "roles.prefill=1", "roles.decode=1", "roles.tp=4"], None),
    ],
)
def test_rendered_script_matches_its_golden_file(name, overrides, array):
    text = rendered(overrides, array)
    path = GOLDEN / name
    if os.environ.get("KVRELAY_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"rendering changed; if on purpose, rerun with KVRELAY_UPDATE_GOLDEN=1 and review {path}"


def test_router_shares_the_first_node_and_ranks_spread_evenly():
    cfg = load_config(DEMO, MULTI_NODE)
    assert placement(cfg).ranks_per_node == [5, 4]
    cfg = load_config(DEMO, ["roles.prefill=3", "roles.decode=4", "slurm.nodes=3"])
    assert placement(cfg).ranks_per_node == [3, 3, 2]


def test_a_tensor_parallel_worker_never_spans_two_nodes():
    # Router + 1 prefill (tp=2) on node 0; the decode workers of 4 ranks on nodes 1 and 2, even
    # though an even spread of the 11 ranks would be [4, 4, 3].
    cfg = load_config(DEMO, ["job.device=cuda", "roles.prefill=1", "roles.decode=2", "roles.prefill_tp=2",
                             "roles.decode_tp=4", "slurm.nodes=3", "slurm.gpus_per_node=4"])
    assert placement(cfg).ranks_per_node == [3, 4, 4]
    # 3 aggregated workers of tp=2 on 2 nodes: [1 + 2, 2 + 2], not [4, 3] with a worker cut in two.
    cfg = load_config(DEMO, ["roles.prefill=0", "roles.decode=0", "roles.aggregated=3", "roles.tp=2", "slurm.nodes=2", "job.device=cuda", "slurm.gpus_per_node=4"])
    assert placement(cfg).ranks_per_node == [3, 4]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["job.device=cuda", "roles.decode=6", "slurm.gpus_per_node=4"],
         "7 workers need one GPU each but slurm.nodes=1 x slurm.gpus_per_node=4 gives 4; set slurm.nodes=2"),
        (["job.device=cuda"], "job.device=cuda but slurm.gpus_per_node=0: set slurm.gpus_per_node"),
        (["slurm.nodes=4"], "slurm.nodes=4 but the job has 3 workers"),
        (["job.device=cuda", "roles.decode=4", "roles.tp=2", "slurm.nodes=2", "slurm.gpus_per_node=4"],
         "5 workers x tp need 10 GPUs but slurm.nodes=2 x slurm.gpus_per_node=4 gives 8; set slurm.nodes=3"),
        (["job.device=cuda", "roles.decode_tp=8", "slurm.nodes=2", "slurm.gpus_per_node=4"],
         "a worker of tp=8 ranks must sit on one node, but slurm.gpus_per_node=4"),
    ],
)
def test_impossible_resources_are_rejected_with_the_key_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        render(load_config(DEMO, overrides, **PATHS), DEMO, overrides)


def test_unknown_slurm_option_lists_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["slurm.partiton=gpu"])
    assert "unknown config key 'slurm.partiton'" in str(e.value)
    assert "partition, account, qos, time, nodes, gpus_per_node" in str(e.value)
    with pytest.raises(ConfigError, match="allowed: srun, mpirun"):
        load_config(DEMO, ["slurm.launcher=aprun"])


def test_a_job_without_its_files_is_rejected():
    with pytest.raises(ConfigError, match="pass -o OUT.jsonl, --model DIR"):
        render(load_config(DEMO, [], **{"input.path": "/data/in.jsonl"}), DEMO, [])


SINFO = "debug|2|(null)\ngpu|16|gpu:h100:4(S:0-1)\ngpu|4|gpu:h100:8\ncpu|64|(null)\n"


def test_partition_checks_against_the_cluster():
    parts = parse_sinfo(SINFO)
    assert [(p.name, p.default, p.nodes, p.gpus_per_node) for p in parts] == [
        ("debug", False, 2, 0), ("gpu", False, 20, 8), ("cpu", False, 64, 0)]
    with pytest.raises(ConfigError, match="no default partition: set slurm.partition to one of: debug, gpu, cpu"):
        check_cluster(load_config(DEMO), parts)
    with pytest.raises(ConfigError, match="'gpus' is not a partition of this cluster; allowed: debug, gpu, cpu"):
        check_cluster(load_config(DEMO, ["slurm.partition=gpus"]), parts)
    with pytest.raises(ConfigError, match="partition 'cpu' have 0 GPUs"):
        check_cluster(load_config(DEMO, ["slurm.partition=cpu", "slurm.gpus_per_node=4", "job.device=cuda"]), parts)
    with pytest.raises(ConfigError, match="slurm.nodes=3 but partition 'debug' has 2 nodes"):
        check_cluster(load_config(DEMO, ["slurm.partition=debug", "slurm.nodes=3"]), parts)
    check_cluster(load_config(DEMO, ["slurm.partition=gpu", "slurm.gpus_per_node=4", "job.device=cuda"]), parts)
    check_cluster(load_config(DEMO), parse_sinfo("batch*|8|(null)\n"))


def test_submitit_needs_the_same_tasks_on_every_node():
    """The refusal and the parameters need no Slurm (submitit's executor itself wants `srun`)."""
    with pytest.raises(ConfigError, match=r"ranks over 2 nodes are \[5, 4\]"):
        parameters(load_config(DEMO, MULTI_NODE))
    params = parameters(load_config(DEMO, ["roles.decode=6", "job.device=cuda", "slurm.nodes=2", "slurm.gpus_per_node=4"]))
    assert params["ntasks_per_node"] == 4 and params["srun_args"] == ["--mpi=pmi2"]
    assert set(params) <= submitit.SlurmExecutor._valid_parameters()


def test_submitit_places_tp_groups_like_sbatch():
    """srun's block distribution puts node i's ranks in a row: with the same count on every node
    and no worker cut, each tp group is on one node."""
    params = parameters(load_config(DEMO, ["roles.prefill=1", "roles.decode=2", "roles.prefill_tp=3", "roles.decode_tp=2",
                                           "job.device=cuda", "slurm.nodes=2", "slurm.gpus_per_node=4"]))
    assert params["ntasks_per_node"] == 4
