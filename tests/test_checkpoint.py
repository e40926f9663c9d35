"""Atomic checkpoint files, RNG snapshots, config hashing and the step's final weights."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from benchmark.engine.checkpoint import (
    atomic_save,
    capture_rng_state,
    config_hash,
    load_checkpoint,
    load_weights,
    restore_checkpoint,
    restore_rng_state,
    resume,
    save_checkpoint,
    save_weights,
)
from benchmark.errors import ConfigError, DataError


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")


class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, classes + 1)
        self.register_buffer("count", torch.tensor(7))

    @property
    def layout(self):
        return ((5, self.head.out_features - 1),)

    def forward(self, x):
        return self.head(self.body(x))


class Loader:
    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"epoch": 0, "position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


class StatefulMethod:
    name = "stateful"

    def __init__(self, thresholds=None):
        self.thresholds = thresholds

    def state_dict(self):
        return {"thresholds": self.thresholds}

    def load_state_dict(self, state):
        self.thresholds = state["thresholds"]


def training_objects(seed=0, classes=3):
    torch.manual_seed(seed)
    model = Net(classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 1 - it / 10)
    return model, optimizer, scheduler


def test_atomic_save_failure_keeps_the_previous_file(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_save({"iteration": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"iteration": 2, "bad": Unpicklable()}, path)
    assert torch.load(path) == {"iteration": 1}
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]      # no temporary file left behind
    atomic_save({"iteration": 3}, path)
    assert torch.load(path) == {"iteration": 3}


def test_rng_state_round_trip():
    state = capture_rng_state(torch.device("cpu"))
    first = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)                       # move every generator on
    restore_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


def test_config_hash_is_canonical():
    @dataclass(frozen=True)
    class Cfg:
        lr: float
        layout: tuple

    a = {"train": Cfg(1e-4, ((100, 150),)), "seed": 0, "groups": (slice(0, 3),)}
    b = {"seed": 0, "groups": [slice(0, 3)], "train": {"layout": [[100, 150]], "lr": 1e-4}}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash({**a, "seed": 1})
    assert len(config_hash(a)) == 64


def test_checkpoint_round_trip_restores_every_piece(tmp_path):
    path = tmp_path / "step.pt"
    model, optimizer, scheduler = training_objects()
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    rank_state = {"rng": capture_rng_state(), "loader": {"epoch": 0, "position": 5}}
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    method=StatefulMethod([0.5, 0.25]), iteration=1, config={"lr": 1e-3},
                    rank_states=[rank_state], extra={"log": [1.0]})
    expected_draw = torch.rand(4)

    fresh, fresh_opt, fresh_sched = training_objects(seed=1)
    loader, method = Loader(), StatefulMethod()
    torch.rand(10)
    resumed = resume(path, model=fresh, optimizer=fresh_opt, scheduler=fresh_sched, scaler=None, loader=loader,
                     method=method, config={"lr": 1e-3})
    assert resumed.iteration == 1 and resumed.extra == {"log": [1.0]}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].equal(optimizer.state_dict()["state"][0]["exp_avg"])
    assert fresh_sched.last_epoch == 1 and fresh_opt.param_groups[0]["lr"] == pytest.approx(0.9e-3)
    assert loader.position == 5 and method.thresholds == [0.5, 0.25]
    assert torch.equal(torch.rand(4), expected_draw)                       # RNG restored

    assert resume(None, model=fresh) is None
    assert resume(tmp_path / "absent.pt", model=fresh) is None


def test_mismatched_configuration_or_layout_is_refused(tmp_path):
    path = tmp_path / "step.pt"
    model, optimizer, scheduler = training_objects()
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    method=StatefulMethod(), iteration=3,
                    config={"train": {"lr": 1e-4, "iterations": 10}, "world_size": 1},
                    rank_states=[{"rng": capture_rng_state(), "loader": {}}])
    state = load_checkpoint(path)
    objects = dict(path=path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                   loader=Loader(), method=StatefulMethod())
    with pytest.raises(ConfigError, match=r"changed: train\.lr: 0\.0001 -> 5e-05; world_size: 1 -> 2") as err:
        restore_checkpoint(state, config={"train": {"lr": 5e-5, "iterations": 10}, "world_size": 2}, **objects)
    assert str(path) in str(err.value) and "delete the file" in err.value.hint

    bigger, opt2, sched2 = training_objects(classes=5)
    with pytest.raises(ConfigError, match=r"layout \(\(5, 3\),\).*layout \(\(5, 5\),\)"):
        restore_checkpoint(state, config={"train": {"lr": 1e-4, "iterations": 10}, "world_size": 1},
                           **{**objects, "model": bigger, "optimizer": opt2, "scheduler": sched2})


def test_weights_round_trip_and_errors(tmp_path):
    model, *_ = training_objects()
    path = tmp_path / "weights.pt"
    save_weights(model, path)
    layout, state = load_weights(path)
    assert layout == ((5, 3),)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    restored = Net()
    restored.load_state_dict(state)

    with pytest.raises(DataError, match="does not exist"):
        load_weights(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot be read") as err:
        load_weights(garbage)
    assert "delete it" in err.value.hint
    other = tmp_path / "other.pt"
    torch.save({"weights": 1}, other)
    with pytest.raises(DataError, match="not a checkpoint of this tool"):
        load_weights(other)

    step = tmp_path / "step.pt"
    m, o, s = training_objects()
    save_checkpoint(step, model=m, optimizer=o, scheduler=s, scaler=None, method=StatefulMethod(), iteration=0,
                    config={}, rank_states=[{"rng": capture_rng_state(), "loader": {}}])
    with pytest.raises(DataError):           # in-step checkpoints are not weights files
        load_weights(step)
