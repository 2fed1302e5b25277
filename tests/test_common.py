"""common.py: base dir, compute dtype, peak FLOPs, rank-0 printing."""
import math
import os

import pytest
import torch

from nanochat import common


def test_base_dir_from_env(tmp_path, monkeypatch):
    target = tmp_path / "artifacts" / "nanochat"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(target))
    assert common.get_base_dir() == str(target)
    assert target.is_dir()  # created on demand


def test_base_dir_given_wins_over_env_and_comes_back_absolute(tmp_path, monkeypatch):
    """An entry point's --storage is resolved once: absolute (workers run in other directories), created, and the
    environment only a default (never written back)."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    assert common.get_base_dir("run") == str(tmp_path / "run") and (tmp_path / "run").is_dir()
    assert common.get_base_dir("file://" + str(tmp_path / "f")) == str(tmp_path / "f")
    assert common.get_base_dir("memory://bucket/run") == "memory://bucket/run"  # a URI root as given
    assert not (tmp_path / "elsewhere").exists() and os.environ["NANOCHAT_BASE_DIR"] == str(tmp_path / "elsewhere")


def test_base_dir_default(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.get_base_dir() == os.path.join(str(tmp_path), ".cache", "nanochat")


def test_compute_dtype(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    assert common.get_compute_dtype("cpu") == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert common.get_compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "float16")
    assert common.get_compute_dtype("cpu") == torch.float16
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE.*bf16"):
        common.get_compute_dtype("cpu")


def test_peak_flops_table():
    assert common.get_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.get_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert common.get_peak_flops("Some Unknown Accelerator") == float("inf")


def test_measured_matmul_peak_is_positive():
    flops = common.measure_matmul_peak_flops("cpu", n=128, iters=2)
    assert flops > 0 and math.isfinite(flops)


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_print0_only_on_rank_zero(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    common.print0("hello from rank", rank)
    assert ("hello from rank" in capsys.readouterr().out) == printed


def test_dist_info_from_env(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert common.get_dist_info() == (False, 0, 0, 1)
    assert not common.is_distributed()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert common.get_dist_info() == (True, 3, 1, 4)
    assert not common.is_distributed()  # env vars alone do not make collectives run


def test_wandb_off_by_default_and_clear_error_when_missing(monkeypatch):
    import builtins

    from nanochat.common import DummyWandb, init_wandb
    assert isinstance(init_wandb("dummy", "nanochat", {}), DummyWandb)
    assert isinstance(init_wandb("myrun", "nanochat", {}, rank=1), DummyWandb)  # only rank 0 logs
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match="pip install wandb"):
        init_wandb("myrun", "nanochat", {})

