"""The validator query, the model input and the training transform."""
import albumentations as A
import numpy as np
import pytest
import torch

from bad_images import photo
from train.data.transforms import EvalTransform, ModelInput, TrainTransform, ValidatorQuery


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_queries_are_224_jpegs_reproducible_per_sample(level):
    image = photo(320, 256)
    query = ValidatorQuery(level, seed=7)
    a, b = query(image, 5), query(image, 5)
    assert a.shape == (224, 224, 3) and np.array_equal(a, b)
    if level > 0:
        assert not np.array_equal(a, query(image, 6))  # another sample, another draw
        assert not np.array_equal(a, ValidatorQuery(level, seed=8)(image, 5))


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="one of"):
        ValidatorQuery(4)


def test_a_drawn_level_query_is_reproducible_per_sample():
    """``ValidatorQuery(None)`` draws the level too, from sample ``i``'s own generator: the same query every time."""
    image = np.random.default_rng(0).integers(0, 256, (180, 240, 3), dtype=np.uint8)
    query = ValidatorQuery(None, seed=3)
    assert query.render(image, 7) == query.render(image, 7)
    assert query(image, 7).shape == (224, 224, 3)


def test_train_transform_swaps_in_validator_queries_at_its_rate():
    """``validator_p`` of the samples are the validator's query instead of the configured transforms (here an
    inversion, so a bright photo comes out dark only when the configured transforms ran)."""
    image = np.full((160, 160, 3), 230, np.uint8)
    dark = {}
    for p in (0.0, 0.5, 1.0):
        train = TrainTransform([A.InvertImg(p=1.0)], img_size=32, mean=(0, 0, 0), std=(1, 1, 1), validator_p=p)
        dark[p] = np.mean([float(train(image, 0, seed=s).mean()) < 0.25 for s in range(80)])
    assert dark[0.0] == 1.0 and dark[1.0] == 0.0 and 0.3 < dark[0.5] < 0.7
    with pytest.raises(ValueError, match="probability"):
        TrainTransform([], img_size=32, validator_p=1.5)


def test_model_input_normalises_to_chw():
    out = ModelInput(32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(np.full((64, 80, 3), 255, np.uint8))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out, torch.ones_like(out))


def test_eval_and_train_transforms_give_model_sized_tensors():
    image = photo(256, 256)
    assert EvalTransform(2, img_size=48)(image, 0).shape == (3, 48, 48)
    train = TrainTransform([A.RandomResizedCrop(size=(100, 100)), A.HorizontalFlip()], img_size=48)
    first = train(image, 0, seed=1)
    assert first.shape == (3, 48, 48) and torch.equal(first, train(image, 0, seed=1))
    assert not torch.equal(first, train(image, 0, seed=2))


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    from train.data.sampling import EpochSampler
    sampler = EpochSampler(50, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(50))  # a permutation
    again = EpochSampler(50, seed=3)
    again.set_epoch(1)
    assert list(again) == first
    again.set_epoch(2)
    assert list(again) != first
    weighted = EpochSampler(1000, seed=0, weights=np.r_[np.full(900, 1 / 900), np.full(100, 1 / 100)])
    share = np.mean([i >= 900 for i, _ in weighted])
    assert 0.42 < share < 0.58  # the minority class is drawn about as often as the majority


def test_epoch_sampler_draws_cycle_each_samples_augmentation():
    """With ``draws=2`` a sample's augmentation seed comes back every 2 epochs (whatever its place in the epoch's
    order, which still changes), so a frozen model's outputs on it can be reused; the default is unchanged."""
    from train.data.sampling import EpochSampler
    sampler = EpochSampler(50, seed=3, draws=2)
    seeds, orders = [], []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        seeds.append(dict(pairs))
        orders.append([i for i, _ in pairs])
    assert seeds[0] == seeds[2] and seeds[1] == seeds[3]
    assert sum(seeds[0][i] == seeds[1][i] for i in range(50)) == 0
    assert orders[0] != orders[2]
    assert list(EpochSampler(50, seed=3, draws=None)) == list(EpochSampler(50, seed=3))
    with pytest.raises(ValueError, match="draws"):
        EpochSampler(50, draws=0)
