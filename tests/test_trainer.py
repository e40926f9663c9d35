"""The engine's training loop, optimiser, schedule and device helpers (CPU, tiny models, seconds)."""

from __future__ import annotations

import math
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from benchmark.batch import Batch, Target
from benchmark.engine.checkpoint import load_checkpoint
from benchmark.engine.device import (
    DistributedContext,
    check_torchvision,
    plan_batches,
    resolve_amp,
    resolve_device,
    seed_everything,
)
from benchmark.engine.optim import PolySchedule, TrainConfig, build_optimizer, build_scheduler
from benchmark.engine.outputs import ModelOutputs
from benchmark.engine.presets import get_preset
from benchmark.engine.trainer import freeze_old_model, train_step_loop
from benchmark.errors import ConfigError, EnvironmentProblem
from methods.base import Method, StepContext

SIZE = 64
COLOURS = torch.tensor([[2.0, -1.0, -1.0], [-1.0, 2.0, -1.0], [-1.0, -1.0, 2.0]])


class Killed(Exception):
    """Stands for the process being killed in the middle of a step."""


class ToyLoader:
    """The loader contract: an infinite iterator of Batch whose content is a function of
    (seed, epoch, sample index); rank r of W at position p reads samples ((p * W + r) * batch + i)."""

    def __init__(self, batch_size, *, seed=0, epoch_len=1000, rank=0, world_size=1, fixed=False, kill_at=None):
        self.batch_size, self.seed, self.epoch_len = batch_size, seed, epoch_len
        self.rank, self.world_size, self.fixed, self.kill_at = rank, world_size, fixed, kill_at
        self.epoch = self.position = self.served = 0

    def __iter__(self):
        return self

    def _sample(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + index)
        label = int(torch.randint(0, 3, (1,), generator=g))
        side = int(torch.randint(16, 40, (1,), generator=g))
        y, x = (int(v) for v in torch.randint(0, SIZE - side, (2,), generator=g))
        mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        mask[y:y + side, x:x + side] = True
        image = 0.3 * torch.randn(3, SIZE, SIZE, generator=g)
        image[:, mask] += COLOURS[label][:, None]
        return image, Target(torch.tensor([label]), mask[None])

    def __next__(self):
        if self.kill_at is not None and self.served >= self.kill_at:
            raise Killed
        first = 0 if self.fixed else (self.position * self.world_size + self.rank) * self.batch_size
        images, targets = zip(*(self._sample(first + i) for i in range(self.batch_size)))
        self.served += 1
        self.position += 1
        if self.position == self.epoch_len:
            self.epoch, self.position = self.epoch + 1, 0
        return Batch(torch.stack(images), torch.ones(len(images), SIZE, SIZE, dtype=torch.long), list(targets),
                     list(range(first, first + len(images))))

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "rank": self.rank}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]


class ToyMethod(Method):
    """Query i learns object i of its image; mask loss on ``points`` random pixels (consumes the RNG,
    so a resume must restore it) or on every pixel; optional KL distillation from the old model."""

    name = "toy"

    def __init__(self, points=64, kd_weight=0.0):
        super().__init__()
        self.points, self.kd_weight = points, kd_weight
        self.needs_old_model = kd_weight > 0
        self.old_calls = 0

    def loss(self, batch, outputs, old_outputs, ctx):
        terms = {}
        for layer in range(outputs.num_layers):
            for group, columns in enumerate(outputs.group_columns):
                suffix = f"{layer}" if group == 0 else f"{layer}_g{group}"
                logits, masks = outputs.class_logits(group, layer), outputs.mask_logits(group, layer)
                B, Q, h, w = masks.shape
                labels = torch.full((B, Q), logits.shape[-1] - 1, dtype=torch.long)
                target_masks = torch.zeros(B, Q, h, w)
                for b, target in enumerate(batch.targets):
                    keep = (target.labels >= columns.start) & (target.labels < columns.stop)
                    n = min(int(keep.sum()), Q)
                    if n:
                        labels[b, :n] = target.labels[keep][:n] - columns.start
                        target_masks[b, :n] = F.interpolate(target.masks[keep][None, :n].float(), size=(h, w))[0]
                terms[f"ce_{suffix}"] = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
                if self.points:
                    index = torch.randint(0, h * w, (self.points,))
                    pred, gold = masks.flatten(2)[..., index], target_masks.flatten(2)[..., index]
                else:
                    pred, gold = masks, target_masks
                terms[f"mask_{suffix}"] = 5 * F.binary_cross_entropy_with_logits(pred.float(), gold)
        if old_outputs is not None:
            self.old_calls += 1
            assert not old_outputs.class_logits().requires_grad
            old = old_outputs.class_logits()
            student = outputs.class_logits()[..., : old.shape[-1]]
            terms["kd"] = self.kd_weight * F.kl_div(student.log_softmax(-1), old.softmax(-1), reduction="batchmean")
        return terms


class ToyModel(nn.Module):
    """A few-parameter stand-in with the SegModel surface the trainer uses (for the DDP test)."""

    def __init__(self, queries=4, classes=3, dim=8):
        super().__init__()
        self.backbone = nn.Conv2d(3, dim, 4, stride=4)
        self.norm = nn.GroupNorm(2, dim)
        self.queries = nn.Embedding(queries, dim)
        self.head = nn.Linear(dim, classes + 1)

    @property
    def layout(self):
        return ((self.queries.num_embeddings, self.head.out_features - 1),)

    def forward(self, pixel_values, pixel_mask=None):
        features = self.norm(self.backbone(pixel_values))
        queries = self.queries.weight[None] + features.mean((2, 3))[:, None]
        masks = torch.einsum("bqd,bdhw->bqhw", queries, features)
        q, c = self.layout[0]
        return ModelOutputs([(self.head(queries),)], [masks], [queries], (features,), features,
                            (slice(0, q),), (slice(0, c),))

    def param_groups(self, lr, weight_decay=0.05, backbone_multiplier=0.1):
        rest = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return [{"params": list(self.backbone.parameters()), "lr": lr * backbone_multiplier,
                 "weight_decay": weight_decay},
                {"params": rest, "lr": lr, "weight_decay": weight_decay}]


def tiny_model(seed=0, layout=((6, 3),)):
    from benchmark.engine.model import build_model

    torch.manual_seed(seed)
    return build_model("tiny", layout)


def make_ctx(step=0, old_model=None, num_old=0):
    return StepContext(protocol=None, step=step, num_old=num_old, num_seen=3, task="semantic", criterion=None,
                       old_model=old_model)


def config(**overrides):
    base = dict(iterations=6, batch_size=2, lr=1e-3, amp="off", checkpoint_every=2, log_every=1)
    return TrainConfig(**{**base, **overrides})


def params_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- optimiser and schedule ------------------------------------------------------------------------

def test_poly_schedule_values_and_backbone_multiplier():
    model = tiny_model()
    cfg = config(iterations=10, lr=2e-4)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    names = [g["name"] for g in optimizer.param_groups]
    for it in range(10):
        for name, group in zip(names, optimizer.param_groups):
            base = 2e-4 * (0.1 if name.startswith("backbone") else 1.0)
            assert group["lr"] == pytest.approx(base * (1 - it / 10) ** 0.9, rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert all(g["lr"] == 0.0 for g in optimizer.param_groups)
    decay = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decay == {"backbone": 0.05, "backbone_no_decay": 0.0, "model": 0.05, "model_no_decay": 0.0}
    warm = PolySchedule(100, 0.9, warmup_iters=10, warmup_factor=0.1)
    assert warm(0) == pytest.approx(0.1)
    assert warm(5) == pytest.approx((0.1 * 0.5 + 0.5) * 0.95 ** 0.9)
    assert warm(50) == pytest.approx(0.5 ** 0.9)


def test_a_step_schedule_may_set_its_own_backbone_multiplier(tmp_path):
    from benchmark.runner import resolve, step_train_config
    from tests.test_runner import spec

    r = resolve(spec("finetune", tmp_path, extra=["--set", "increment.backbone_multiplier=0.1"]))
    assert r.train.backbone_multiplier == 1.0          # the cpu schedule's: step 0 trains from scratch
    lrs = {}
    for t in (0, 1):
        cfg = step_train_config(r.train, r.schedule.for_step(t))
        lrs[t] = {g["name"]: g["lr"] for g in build_optimizer(tiny_model(), cfg).param_groups}
    assert lrs[0]["backbone"] == lrs[0]["model"] == r.schedule.step0.lr
    assert lrs[1]["backbone"] == pytest.approx(0.1 * lrs[1]["model"]) and lrs[1]["model"] == r.schedule.increment.lr
    assert r.config["schedule"]["increment"]["backbone_multiplier"] == 0.1


def test_a_step_schedule_may_set_its_own_warmup(tmp_path):
    from benchmark.engine.optim import build_scheduler
    from benchmark.runner import resolve, step_train_config
    from tests.test_runner import spec

    r = resolve(spec("finetune", tmp_path, extra=["--set", "increment.warmup_iters=10", "--set", "increment.warmup_factor=0.001",
                                              "--set", "increment.iterations=100"]))
    factors = {}
    for t in (0, 1):
        cfg = step_train_config(r.train, r.schedule.for_step(t))
        scheduler = build_scheduler(build_optimizer(tiny_model(), cfg), cfg)
        factors[t] = [scheduler.lr_lambdas[0](i) for i in (0, 5, 10)]
    assert factors[0][0] == 1.0                                     # step 0 keeps the run's (no warm-up)
    assert factors[1][0] == pytest.approx(0.001) and factors[1][0] < factors[1][1] < factors[1][2]
    assert r.config["schedule"]["increment"]["warmup_iters"] == 10 and r.config["schedule"]["step0"]["warmup_iters"] is None


def test_optimizer_leaves_frozen_parameters_out_and_refuses_missing_ones():
    model = ToyModel()
    model.queries.weight.requires_grad_(False)
    optimizer = build_optimizer(model, config())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.queries.weight) not in in_optimizer
    assert len(in_optimizer) == sum(1 for p in model.parameters() if p.requires_grad)

    class Forgetful(ToyModel):
        def param_groups(self, lr, weight_decay=0.05, backbone_multiplier=0.1):
            return super().param_groups(lr, weight_decay, backbone_multiplier)[:1]

    with pytest.raises(ValueError, match="head.weight"):
        build_optimizer(Forgetful(), config())


def test_train_config_validation():
    with pytest.raises(ConfigError, match="lr must be positive"):
        TrainConfig(iterations=1, batch_size=1, lr=0)
    with pytest.raises(ConfigError, match="amp must be one of"):
        TrainConfig(amp="maybe")
    assert "log_every" not in TrainConfig().result_settings()
    assert TrainConfig().result_settings()["grad_clip"] == 0.01


# --- devices -----------------------------------------------------------------------------------------

def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(EnvironmentProblem, match="CUDA is not available") as err:
        resolve_device("cuda")
    assert "--device cpu" in err.value.hint
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    # Two visible GPUs: each process takes the one of its local rank (modulo what it can see).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    with pytest.raises(EnvironmentProblem, match="GPU index 5.*2 GPU"):
        resolve_device("cuda:5")
    assert DistributedContext(rank=1, world_size=2, local_rank=1).device(torch.device("cuda", 0)) == \
        torch.device("cuda", 1)


def test_resolve_amp():
    assert resolve_amp("auto", torch.device("cpu")) is False
    assert resolve_amp("auto", torch.device("cuda", 0)) is True
    assert resolve_amp("off", torch.device("cuda", 0)) is False
    with pytest.raises(ConfigError, match="amp=on needs a CUDA device"):
        resolve_amp("on", torch.device("cpu"))


def test_plan_batches():
    assert plan_batches(16, 1) == plan_batches(16, 1, 16)
    assert plan_batches(16, 4).per_rank == 4
    plan = plan_batches(16, 1, max_device_batch=6)      # 16 = 4 x 4: the smallest even split under 6
    assert (plan.micro_batch, plan.accumulation) == (4, 4)
    plan = plan_batches(32, 2, max_device_batch=8)
    assert (plan.per_rank, plan.micro_batch, plan.accumulation) == (16, 8, 2)
    with pytest.raises(ConfigError, match="not divisible by the 3"):
        plan_batches(16, 3)


def test_check_torchvision(tmp_path, monkeypatch):
    assert "torchvision" not in sys.modules
    check_torchvision()                                  # absent: fine
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EnvironmentProblem, match="torchvision::nms does not exist") as err:
        check_torchvision()
    assert "pip uninstall -y torchvision" in err.value.hint
    assert "torchvision" not in sys.modules


def test_distributed_context_from_env(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    single = DistributedContext.from_env("cpu")
    assert (single.rank, single.world_size, single.active, single.is_main) == (0, 1, False, True)
    assert single.all_gather_object({"a": 1}) == [{"a": 1}]
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(EnvironmentProblem, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"):
        DistributedContext.from_env("cpu")


def test_seed_everything_repeats_draws():
    import random

    import numpy as np

    seed_everything(7)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(7)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


# --- the training loop -------------------------------------------------------------------------------

def test_a_few_steps_on_a_fixed_batch_lower_the_loss():
    model = tiny_model()
    log = train_step_loop(model, ToyMethod(points=None), make_ctx(), ToyLoader(2, fixed=True),
                          config(iterations=8, grad_clip=0.0), checkpoint_path=None, device="cpu", progress=False)
    losses = [row["loss"] for row in log.history]
    assert len(losses) == 8 and [row["iteration"] for row in log.history] == list(range(1, 9))
    assert losses[-1] < 0.7 * losses[0]
    layers = get_preset("tiny").decoder_layers        # one ce and one mask term per prediction set
    assert set(log.term_means) == {f"{k}_{i}" for k in ("ce", "mask") for i in range(layers)}
    assert log.loss_mean == pytest.approx(sum(log.term_means.values()))
    assert log.iterations == 8 and log.start_iteration == 0


def test_engine_set_loss_on_a_fixed_batch_goes_down():
    from benchmark.engine.criterion import SetCriterion

    ctx = make_ctx()
    ctx.criterion = SetCriterion(num_points=256)
    log = train_step_loop(tiny_model(), Method(), ctx, ToyLoader(2, fixed=True), config(iterations=8),
                          checkpoint_path=None, device="cpu", progress=False)
    assert set(log.term_means) == {"ce", "mask", "dice"}
    assert log.history[-1]["loss"] < 0.8 * log.history[0]["loss"]


def test_gradient_clipping_bounds_the_full_model_norm():
    def run(clip):
        norms = []

        def hook(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

        handle = register_optimizer_step_pre_hook(hook)
        try:
            log = train_step_loop(tiny_model(), ToyMethod(points=None), make_ctx(), ToyLoader(2),
                                  config(iterations=3, grad_clip=clip), checkpoint_path=None, device="cpu",
                                  progress=False)
        finally:
            handle.remove()
        return norms, log

    clipped, log = run(0.01)
    assert len(clipped) == 3 and max(clipped) <= 0.01 * (1 + 1e-4)
    assert all(row["grad_norm"] > 0.01 for row in log.history)      # clipping really cut something
    free, log = run(0.0)
    assert min(free) > 0.01 and "grad_norm" not in log.history[0]


def test_frozen_parameters_do_not_move_while_the_rest_trains():
    model = tiny_model(layout=((6, 3), (4, 2)))
    frozen = model.content_query_parameters(0)[0]
    frozen.requires_grad_(False)
    before = params_of(model)
    train_step_loop(model, ToyMethod(), make_ctx(), ToyLoader(2), config(iterations=3), checkpoint_path=None,
                    device="cpu", progress=False)
    after = params_of(model)
    name = next(n for n, p in model.named_parameters() if p is frozen)
    assert torch.equal(before[name], after[name])
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(before[n], after[n])]
    assert len(moved) == sum(1 for p in model.parameters() if p.requires_grad)


def test_old_model_runs_once_per_batch_without_gradients():
    model = tiny_model()
    old = freeze_old_model(model)
    assert not old.training and not any(p.requires_grad for p in old.parameters())
    old_before = params_of(old)
    calls = []
    old.register_forward_hook(lambda module, args, out: calls.append(torch.is_grad_enabled()))
    method = ToyMethod(kd_weight=1.0)
    cfg = config(iterations=2, batch_size=4, max_device_batch=2)
    log = train_step_loop(model, method, make_ctx(step=1, old_model=old, num_old=3), ToyLoader(2), cfg,
                          checkpoint_path=None, device="cpu", progress=False)
    assert calls == [False] * 4 and method.old_calls == 4    # 2 iterations x 2 micro-batches
    assert "kd" in log.term_means
    assert all(torch.equal(v, params_of(old)[k]) for k, v in old_before.items())

    plain = ToyMethod()                                       # needs_old_model False: the old model is skipped
    train_step_loop(tiny_model(), plain, make_ctx(step=1, old_model=old), ToyLoader(2), config(iterations=1),
                    checkpoint_path=None, device="cpu", progress=False)
    assert len(calls) == 4 and plain.old_calls == 0


def test_gradient_accumulation_matches_the_full_batch():
    # The ToyModel has no BatchNorm: with BatchNorm, statistics over 2 images differ from those over 4.
    def run(max_device_batch, micro):
        torch.manual_seed(0)
        model = ToyModel()
        loader = ToyLoader(micro)
        train_step_loop(model, ToyMethod(points=None), make_ctx(), loader,
                        config(iterations=2, batch_size=4, max_device_batch=max_device_batch),
                        checkpoint_path=None, device="cpu", progress=False)
        return params_of(model), loader.served

    full, served_full = run(None, 4)
    split, served_split = run(2, 2)
    assert (served_full, served_split) == (2, 4)
    for key in full:
        torch.testing.assert_close(split[key], full[key], rtol=1e-4, atol=1e-6)


def test_wrong_batch_size_and_bad_loss_terms_are_reported():
    with pytest.raises(ConfigError, match="batches of 3 images, but each process needs micro-batches of 2"):
        train_step_loop(tiny_model(), ToyMethod(), make_ctx(), ToyLoader(3), config(), checkpoint_path=None,
                        device="cpu", progress=False)

    class VectorLoss(ToyMethod):
        def loss(self, batch, outputs, old_outputs, ctx):
            return {"per_query": outputs.class_logits().mean((0, 2))}

    with pytest.raises(TypeError, match="loss term 'per_query' must be a scalar tensor, got \\(6,\\)"):
        train_step_loop(tiny_model(), VectorLoss(), make_ctx(), ToyLoader(2), config(), checkpoint_path=None,
                        device="cpu", progress=False)


def engine_ctx():
    """The standard engine step: Method's default loss is the set criterion (random point sampling)."""
    from benchmark.engine.criterion import SetCriterion

    ctx = make_ctx()
    ctx.criterion = SetCriterion(num_points=256)
    return ctx


def test_resume_after_a_kill_is_bit_identical(tmp_path):
    cfg = config(iterations=6, checkpoint_every=2)
    seed_everything(0)
    straight_model = tiny_model()
    straight = train_step_loop(straight_model, Method(), engine_ctx(), ToyLoader(2), cfg,
                               checkpoint_path=tmp_path / "straight.pt", device="cpu", progress=False)
    expected = params_of(straight_model)

    seed_everything(0)
    ckpt = tmp_path / "killed.pt"
    with pytest.raises(Killed):           # dies fetching iteration 5's batch: iteration 4 is lost
        train_step_loop(tiny_model(), Method(), engine_ctx(), ToyLoader(2, kill_at=5), cfg,
                        checkpoint_path=ckpt, device="cpu", progress=False)
    assert load_checkpoint(ckpt)["iteration"] == 4

    seed_everything(123)                  # a fresh process: other RNG state, other initial weights
    model, ctx = tiny_model(seed=99), engine_ctx()
    resumed = train_step_loop(model, Method(), ctx, ToyLoader(2), cfg, checkpoint_path=ckpt, device="cpu",
                              progress=False)
    assert resumed.start_iteration == 4 and ctx.iteration == 6
    got = params_of(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert resumed.history == straight.history
    assert resumed.term_means == straight.term_means

    # The step is complete: calling again restores the final state without training.
    model = tiny_model(seed=5)
    again = train_step_loop(model, Method(), engine_ctx(), ToyLoader(2, kill_at=0), cfg, checkpoint_path=ckpt,
                            device="cpu", progress=False)
    assert again.start_iteration == 6 and again.history == straight.history
    assert all(torch.equal(v, expected[k]) for k, v in params_of(model).items())


def test_resume_with_another_configuration_is_refused(tmp_path):
    ckpt = tmp_path / "step.pt"
    train_step_loop(tiny_model(), ToyMethod(), make_ctx(), ToyLoader(2), config(iterations=2), checkpoint_path=ckpt,
                    device="cpu", progress=False)
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.001 -> 0\.002") as err:
        train_step_loop(tiny_model(), ToyMethod(), make_ctx(), ToyLoader(2), config(iterations=2, lr=2e-3),
                        checkpoint_path=ckpt, device="cpu", progress=False)
    assert "delete the file" in err.value.hint
    # Bookkeeping settings may change on resume.
    log = train_step_loop(tiny_model(), ToyMethod(), make_ctx(), ToyLoader(2),
                          config(iterations=2, log_every=5, checkpoint_every=7), checkpoint_path=ckpt,
                          device="cpu", progress=False)
    assert log.start_iteration == 2


# --- DistributedDataParallel (2 gloo processes) ----------------------------------------------------

def _ddp_worker(rank, world_size, port, out_dir, tag):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist = DistributedContext.from_env("cpu")
    try:
        torch.manual_seed(0)
        model = ToyModel()
        loader = ToyLoader(1, rank=rank, world_size=world_size)
        log = train_step_loop(model, ToyMethod(points=None), make_ctx(), loader,
                              config(iterations=3, batch_size=2, checkpoint_every=2), device="cpu", dist=dist,
                              checkpoint_path=Path(out_dir) / "ddp.pt", progress=False)
        torch.save({"state": model.state_dict(), "log": log.to_dict()}, Path(out_dir) / f"{tag}{rank}.pt")
    finally:
        dist.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process_accumulation(tmp_path):
    def launch(tag):
        # fork: the workers inherit the imported torch instead of paying seconds to import it again.
        torch.multiprocessing.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path), tag), nprocs=2,
                                              join=True, start_method="fork")
        return [torch.load(tmp_path / f"{tag}{r}.pt", weights_only=False) for r in range(2)]

    ranks = launch("rank")
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    assert ranks[0]["log"]["history"] != ranks[1]["log"]["history"]       # each rank logs its own data

    torch.manual_seed(0)
    model = ToyModel()
    train_step_loop(model, ToyMethod(points=None), make_ctx(), ToyLoader(1),
                    config(iterations=3, batch_size=2, max_device_batch=1), checkpoint_path=None, device="cpu",
                    progress=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-5, atol=1e-6)

    ckpt = load_checkpoint(tmp_path / "ddp.pt")             # written by rank 0 with every rank's state
    assert ckpt["iteration"] == 3 and ckpt["config"]["world_size"] == 2
    assert [r["loader"] for r in ckpt["ranks"]] == [{"epoch": 0, "position": 3, "rank": 0},
                                                    {"epoch": 0, "position": 3, "rank": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.pt", "rank0.pt", "rank1.pt"]
    assert math.isfinite(ranks[0]["log"]["loss_mean"])

    again = launch("again")                                  # the complete step: every rank gets its own log back
    assert [a["log"]["start_iteration"] for a in again] == [3, 3]
    assert [a["log"]["history"] for a in again] == [r["log"]["history"] for r in ranks]


# --- mixed precision, divergence, logging ----------------------------------------------------------

def test_fp16_grad_scaler_path_checkpoints_and_resumes(tmp_path, monkeypatch):
    # CUDA is absent here: run the AMP code path with CPU autocast (the same GradScaler logic).
    import benchmark.engine.trainer as trainer

    monkeypatch.setattr(trainer, "resolve_amp", lambda setting, device: True)
    ckpt = tmp_path / "amp.pt"
    cfg = config(iterations=8, amp_dtype="float16", checkpoint_every=0)
    torch.manual_seed(0)
    model = ToyModel()
    before = params_of(model)
    log = train_step_loop(model, ToyMethod(points=None), make_ctx(), ToyLoader(2), cfg, checkpoint_path=ckpt,
                          device="cpu", progress=False)
    saved = load_checkpoint(ckpt)
    assert saved["config"]["amp"] is True
    # fp16 gradients overflow at the initial scale 2**16: the scaler skips those steps and backs off
    # until the steps go through.
    skipped = sum(row["overflow_steps"] for row in log.history)
    assert 1 <= skipped < 8 and saved["scaler"]["scale"] == 2.0 ** 16 * 0.5 ** skipped
    assert not torch.equal(before["head.weight"], params_of(model)["head.weight"])
    assert math.isfinite(log.history[-1]["grad_norm"])
    again = train_step_loop(ToyModel(), ToyMethod(points=None), make_ctx(), ToyLoader(2), cfg,
                            checkpoint_path=ckpt, device="cpu", progress=False)
    assert again.start_iteration == 8 and str(again.history) == str(log.history)   # nan == nan as text


def test_divergence_stops_with_a_clear_error():
    class Exploding(ToyMethod):
        def loss(self, batch, outputs, old_outputs, ctx):
            return {"bad": outputs.class_logits().sum() * float("nan")}

    from benchmark.engine.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"not finite at iteration 1 \(terms \['bad', 'grad_norm', 'loss'\]\)"):
        train_step_loop(ToyModel(), Exploding(), make_ctx(), ToyLoader(2), config(), checkpoint_path=None,
                        device="cpu", progress=False)


def test_without_a_terminal_progress_goes_to_the_log(caplog):
    with caplog.at_level("INFO", logger="benchmark.engine.trainer"):
        train_step_loop(ToyModel(), ToyMethod(), make_ctx(step=2), ToyLoader(2), config(iterations=4, log_every=2),
                        checkpoint_path=None, device="cpu", progress=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("step 2: iteration 2/4 loss ") and " eta 0:00:" in lines[0]


def test_step_log_summary_is_one_readable_line():
    from benchmark.engine.trainer import StepLog

    log = StepLog(step=1, iterations=300, start_iteration=100, wall_time_s=40.0,
                  term_means={"ce": 0.5, "mask": 0.25}, loss_mean=0.75, history=[{"iteration": 300.0}])
    line = log.summary()
    assert line == "300 iterations (resumed at 100) in 40.0 s, 5.00 it/s; mean loss 0.75 (ce 0.5, mask 0.25)"
    assert "\n" not in line and "history" not in line
