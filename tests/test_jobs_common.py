"""ray_jobs/common.py: the shared glue of the Ray entry points."""
from ray_jobs.common import pick_loader


def test_loader_auto_takes_ray_data_only_with_cpus_to_spare(ray_local, capsys):
    assert pick_loader("plain", 1, 1) == "plain" and pick_loader("ray", 8, 1) == "ray"  # explicit choices stand
    assert pick_loader("auto", 2, 1) == "ray"  # 8 CPUs: 2 for the trainers, 6 spare >= 2 x 1.5
    assert pick_loader("auto", 4, 1) == "plain"  # 4 spare < 4 x 1.5: Ray Data would starve the trainers
    assert "--loader auto: plain (8 CPUs in the cluster, 4 x 1 reserved" in capsys.readouterr().out
