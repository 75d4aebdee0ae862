import random

import numpy as np
import pytest
import torch

from msopt.core import (
    PROFILES,
    Stopwatch,
    environment,
    get_device,
    pick,
    profile,
    read_json,
    run_dir,
    seed_everything,
    write_json,
)


def test_profile_default_and_env(monkeypatch):
    monkeypatch.delenv("MSOPT_PROFILE", raising=False)
    assert profile() == ("small" if torch.cuda.is_available() else "tiny")
    for name in PROFILES:
        monkeypatch.setenv("MSOPT_PROFILE", name.upper())
        assert profile() == name


def test_unknown_profile(monkeypatch):
    monkeypatch.setenv("MSOPT_PROFILE", "huge")
    with pytest.raises(ValueError, match="unknown profile MSOPT_PROFILE='huge'"):
        profile()


def test_pick(monkeypatch):
    monkeypatch.setenv("MSOPT_PROFILE", "small")
    assert pick({"tiny": 1, "small": 2}) == 2
    assert pick({"tiny": 1, "small": 2}, "tiny") == 1
    with pytest.raises(ValueError, match="no sizes for profile 'full'"):
        pick({"tiny": 1}, "full")


def test_seed_everything_repeats_every_generator():
    def draw():
        return torch.rand(4).tolist(), np.random.rand(2).tolist(), random.random()
    seed_everything(7)
    a = draw()
    seed_everything(7)
    b = draw()
    seed_everything(8)
    c = draw()
    assert a == b and a != c
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        seed_everything(-1)


def test_get_device(monkeypatch):
    assert get_device("cpu").type == "cpu" and get_device("cpu:0") == torch.device("cpu", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert get_device() == torch.device("cuda")                       # CUDA first when there is one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert get_device() == torch.device("mps")                        # then Apple's MPS
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert get_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'cuda' asked for but CUDA is not available"):
        get_device("cuda")


def test_run_dir_and_json(tmp_path, monkeypatch):
    monkeypatch.setenv("MSOPT_RUNS", str(tmp_path))
    d = run_dir("a/b")
    assert d == tmp_path / "a" / "b" and d.is_dir()
    write_json(d / "x.json", {"k": [1, 2]})
    assert read_json(d / "x.json") == {"k": [1, 2]}
    assert not list(d.glob("*.tmp"))
    (d / "junk").write_text("x")
    assert not (run_dir("a/b", fresh=True) / "junk").exists()
    for bad in ("", "../up", "/abs"):
        with pytest.raises(ValueError, match="run name must be a relative path"):
            run_dir(bad)


def test_environment_and_stopwatch():
    env = environment()
    assert env["torch"] == torch.__version__ and env["profile"] in PROFILES
    line = Stopwatch().summary()
    assert line.startswith("device ") and "wall time" in line
