"""Training / evaluation views and loaders: targets of protocols.md, augmentation, determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmark.batch import Batch, EvalSample
from benchmark.data import (AugConfig, EvalView, SampleKey, SynthSpec, TrainLoader, TrainView, collate, eval_loader,
                            open_dataset, single_pass)
from benchmark.data.transforms import PIXEL_MEAN, PIXEL_STD, augment_semantic, choose_crop, resized_shape
from benchmark.errors import ConfigError, DataError
from protocols import get_protocol
from tests.test_data_writers import write_coco, write_voc

SPEC = SynthSpec(num_classes=20, seed=1, train_images=40, val_images=6)


def no_aug(short_side: int) -> AugConfig:
    """Keeps images of short side ``short_side`` unchanged: resized to themselves, crop larger than the image."""
    scale = short_side / 512
    return AugConfig(crop_size=512, scale_range=(scale, scale), flip=False, color_jitter=False)



@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CISDQ_BENCH_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return tmp_path_factory.mktemp("synth")


def synth(root, task="synth", split="train"):
    return open_dataset(task, root, split, spec=SPEC, cache_dir=root / "cache", progress=False)


def unnormalise(pixels: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(PIXEL_MEAN).view(3, 1, 1), torch.tensor(PIXEL_STD).view(3, 1, 1)
    return (pixels * std + mean).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def test_voc_targets_are_the_step_classes_as_columns(tmp_path):
    write_voc(tmp_path, {"a": [3, 16], "b": [16, 17], "c": [2]}, {"v": [1]})
    ds = open_dataset("voc", tmp_path, "train")
    protocol = get_protocol("voc-15-1")
    view0 = TrainView(ds, protocol, 0, no_aug(20))
    assert view0.indices.tolist() == [0, 2]
    sample = view0[0]
    label = ds.load(0)[1]
    # step 0: background and class 3 (class 16 is a future class: no target)
    assert sample.target.labels.tolist() == [protocol.column(0), protocol.column(3)]
    assert torch.equal(sample.target.masks, torch.from_numpy(np.stack([label == 0, label == 3])))
    assert sample.image_id == "a"
    assert np.abs(unnormalise(sample.image).astype(int) - ds.load_image(0).astype(int)).max() <= 1
    view1 = TrainView(ds, protocol, 1, no_aug(20))
    assert view1.indices.tolist() == [0, 1]
    target = view1[1].target
    assert target.labels.tolist() == [protocol.column(16)] == [16]           # no background at step 1
    assert torch.equal(target.masks[0], torch.from_numpy(ds.load(1)[1] == 16))


def test_instance_targets_are_the_step_instances(tmp_path):
    write_coco(tmp_path, {"train": {5: [(1, (0, 0, 10, 10), "rle"), (62, (12, 4, 20, 14), "polygon"),
                                        (3, (20, 10, 30, 20), "rle")]}, "val": {6: [(1, (0, 0, 4, 4), "rle")]}})
    ds = open_dataset("coco", tmp_path, "train")
    protocol = get_protocol("coco-40-40")
    sample = TrainView(ds, protocol, 0, no_aug(24))[0]
    columns = sorted(protocol.column(c) for c in (1, 3, 62))       # all three are base classes of the CisDQ order
    assert sample.target.labels.tolist() == columns
    truth = {c: m for c, m in ds.load(0)[1]}
    by_column = {protocol.column(c): torch.from_numpy(m) for c, m in truth.items()}
    for label, mask in zip(sample.target.labels.tolist(), sample.target.masks):
        assert torch.equal(mask, by_column[label])
    with pytest.raises(DataError, match="no training image"):
        TrainView(ds, protocol, 1, no_aug(24))


def test_augmentation_is_deterministic_and_keeps_a_step_class_in_the_crop(synth_root):
    ds = synth(synth_root)
    protocol = get_protocol("synth-10-2")
    aug = AugConfig(crop_size=32, scale_range=(1.5, 2.0))
    view = TrainView(ds, protocol, 1, aug)
    for position in range(len(view)):
        key = SampleKey(position, seed=7, epoch=2, position=position)
        a, b = view[key], view[key]
        assert torch.equal(a.image, b.image) and torch.equal(a.target.masks, b.target.masks)
        assert a.image.shape == (3, 32, 32)
        assert len(a.target) >= 1                                  # the crop retries found a step class
        assert set(a.target.labels.tolist()) <= {10, 11}
        assert a.target.masks.shape[1:] == a.image.shape[1:]
    assert not torch.equal(view[SampleKey(0, 7, 2, 0)].image, view[SampleKey(0, 7, 3, 0)].image)


def test_instance_augmentation_crops_masks_with_the_image(synth_root):
    ds = synth(synth_root, "synth-inst")
    protocol = get_protocol("synth-inst-10-2")
    view = TrainView(ds, protocol, 0, AugConfig(crop_size=32, scale_range=(1.0, 2.0), color_jitter=False))
    semantic = synth(synth_root)
    for position in range(8):
        sample = view[SampleKey(position, 1, 0, position)]
        assert sample.image.shape == (3, 32, 32) and sample.target.masks.shape[1:] == (32, 32)
        assert len(sample.target) >= 1 and sample.target.masks.flatten(1).any(1).all()   # empty masks dropped
        assert set(sample.target.labels.tolist()) <= set(range(10))
        expected = {protocol.column(c) for c in semantic.classes_in(int(view.indices[position])) if c <= 10}
        assert set(sample.target.labels.tolist()) <= expected
    with pytest.raises(ConfigError, match="instance protocol"):
        TrainView(semantic, protocol, 0)


def test_crop_retries_until_accepted():
    rng = np.random.default_rng(0)
    label = np.zeros((100, 100), np.uint8)
    label[90:, 90:] = 5
    ys, xs = choose_crop(100, 100, 20, rng, lambda y, x: bool((label[y, x] == 5).any()), retries=1000)
    assert (label[ys, xs] == 5).any()
    assert resized_shape(100, 400, 50, 120) == (30, 120)            # long side capped
    image = np.zeros((100, 100, 3), np.uint8)
    out_image, out_label = augment_semantic(image, label, [5], AugConfig(crop_size=16, scale_range=(1, 1),
                                                                         crop_retries=1), rng)
    assert out_image.shape == (16, 16, 3) and out_label.shape == (16, 16)


def test_collate_pads_to_a_multiple_of_32(synth_root):
    view = TrainView(synth(synth_root), get_protocol("synth-10-2"), 0, AugConfig(crop_size=40, scale_range=(0.5, 0.6)))
    samples = [view[i] for i in range(3)]
    batch = collate(samples)
    assert isinstance(batch, Batch) and batch.pixel_values.shape[2] % 32 == 0 and batch.pixel_values.shape[3] % 32 == 0
    for b, sample in enumerate(samples):
        _, h, w = sample.image.shape
        assert batch.pixel_mask[b].sum() == h * w and batch.pixel_mask[b, :h, :w].all()
        assert torch.equal(batch.pixel_values[b, :, :h, :w], sample.image)
        assert batch.pixel_values[b, :, h:].abs().sum() == 0
        assert batch.targets[b].masks.shape[1:] == batch.pixel_values.shape[2:]
        assert not batch.targets[b].masks[:, h:].any() and not batch.targets[b].masks[:, :, w:].any()
        assert torch.equal(batch.targets[b].masks[:, :h, :w], sample.target.masks)
    assert batch.image_ids == [s.image_id for s in samples]


def test_loader_is_independent_of_workers_and_resumes_exactly(synth_root):
    view = TrainView(synth(synth_root), get_protocol("synth-10-2"), 2, AugConfig(crop_size=32))
    n = len(view)
    reference = TrainLoader(view, batch_size=3, seed=5, workers=0)
    batches = [next(reference) for _ in range(n)]            # 3 epochs' worth, spanning epoch boundaries
    assert reference.state_dict() == {"epoch": 3, "position": 0}
    ids = [i for b in batches for i in b.image_ids][:n]
    assert sorted(ids) == sorted(view.ds.image_id(int(i)) for i in view.indices)   # epoch 0 is a permutation

    with_workers = TrainLoader(view, batch_size=3, seed=5, workers=2)
    for expected in batches[:4]:
        got = next(with_workers)
        assert got.image_ids == expected.image_ids and torch.equal(got.pixel_values, expected.pixel_values)
    state = with_workers.state_dict()
    with_workers.close()

    resumed = TrainLoader(view, batch_size=3, seed=5, workers=0)
    resumed.load_state_dict(state)
    for expected in batches[4:9]:
        got = next(resumed)
        assert got.image_ids == expected.image_ids and torch.equal(got.pixel_values, expected.pixel_values)
        assert all(torch.equal(a.masks, b.masks) for a, b in zip(got.targets, expected.targets))
    other_seed = TrainLoader(view, batch_size=3, seed=6)
    assert [next(other_seed).image_ids for _ in range(3)] != [b.image_ids for b in batches[:3]]
    with pytest.raises(ConfigError):
        resumed.load_state_dict({"epoch": 0, "position": n})


def test_loader_ranks_split_the_global_batch(synth_root):
    view = TrainView(synth(synth_root), get_protocol("synth-10-2"), 0, AugConfig(crop_size=32))
    single = TrainLoader(view, batch_size=4, seed=0)
    rank0 = TrainLoader(view, batch_size=2, seed=0, rank=0, world_size=2)
    rank1 = TrainLoader(view, batch_size=2, seed=0, rank=1, world_size=2)
    for _ in range(3):
        whole = next(single)
        assert next(rank0).image_ids + next(rank1).image_ids == whole.image_ids
    assert rank0.state_dict() == single.state_dict()


def test_single_pass_visits_every_image_once(synth_root):
    view = TrainView(synth(synth_root), get_protocol("synth-10-2"), 1, AugConfig(crop_size=32))
    ids = [i for batch in single_pass(view, batch_size=4) for i in batch.image_ids]
    assert ids == [view.ds.image_id(int(i)) for i in view.indices]


def test_eval_view_and_loader(synth_root):
    ds = synth(synth_root, split="val")
    view = EvalView(ds, 48)
    samples = list(eval_loader(view, workers=0))
    assert len(samples) == len(ds) == 6
    for i, sample in enumerate(samples):
        image, label = ds.load(i)
        assert isinstance(sample, EvalSample) and sample.image_id == ds.image_id(i)
        assert sample.orig_size == label.shape
        assert min(sample.pixel_values.shape[1:]) == 48
        assert sample.target.dtype == np.int64 and np.array_equal(sample.target, label)
    inst = EvalView(synth(synth_root, "synth-inst", "val"), None)[0]
    assert inst.pixel_values.shape[1:] == inst.orig_size
    assert all(m.shape == inst.orig_size and m.dtype == bool for _, m in inst.target)


def test_aug_config_validation():
    with pytest.raises(ConfigError):
        AugConfig(scale_range=(2.0, 1.0))
    with pytest.raises(ConfigError):
        AugConfig(crop_retries=0)
    assert AugConfig(crop_size=96).eval_size == 96 and AugConfig(test_size=80).eval_size == 80
