"""The recipe's arithmetic: Eq. 6 warm-up, cosine decay, cooldown, EMA, data order, dropout slicing."""

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from training.config import TrainConfig
from training.recipe import (
    GlobalBatchDropout,
    batch_indices,
    ema_decay_at,
    get_lr,
    update_ema,
    use_global_batch_dropout,
)

BASE = TrainConfig(preset="tiny", dataset="synthetic", out="unused", lr=1e-4, warmup_multiplier=2.0,
                   warmup_epochs=5.0, lr_schedule="constant")


@pytest.mark.parametrize("epoch", [0.0, 0.37, 1.0, 2.5, 4.99, 5.0])
def test_eq6_warmup(epoch):
    # lr = base_lr * ((multiplier - 1) * epoch / warm_epoch + 1), written out independently.
    assert get_lr(epoch, BASE, 100.0) == pytest.approx(1e-4 * ((2.0 - 1) * epoch / 5.0 + 1), rel=1e-12)


def test_after_warmup_constant_and_cosine():
    assert get_lr(5.01, BASE, 100.0) == pytest.approx(2e-4)
    assert get_lr(77.0, BASE, 100.0) == pytest.approx(2e-4)
    cosine = dataclasses.replace(BASE, lr_schedule="cosine")
    assert get_lr(5.0, cosine, 105.0) == pytest.approx(2e-4)  # continuous at the end of the ramp
    assert get_lr(55.0, cosine, 105.0) == pytest.approx(1e-4)  # half-way: half the peak
    assert get_lr(105.0, cosine, 105.0) == pytest.approx(0.0, abs=1e-15)
    values = [get_lr(e, cosine, 105.0) for e in torch.linspace(5.0, 105.0, 50).tolist()]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_multiplier_one_is_linear_warmup_from_zero():
    plain = dataclasses.replace(BASE, warmup_multiplier=1.0, warmup_epochs=2.0)
    assert get_lr(0.0, plain, 10.0) == 0.0
    assert get_lr(0.5, plain, 10.0) == pytest.approx(0.25e-4)
    assert get_lr(2.0, plain, 10.0) == pytest.approx(1e-4)
    assert get_lr(3.0, plain, 10.0) == pytest.approx(1e-4)


def test_no_warmup():
    none = dataclasses.replace(BASE, warmup_epochs=0.0)
    assert get_lr(0.0, none, 10.0) == pytest.approx(2e-4)


@pytest.mark.parametrize("shape, decay", [("1-sqrt", lambda p: 1 - p ** 0.5), ("linear", lambda p: 1 - p)])
def test_cooldown_is_the_constant_rate_then_its_decay_to_zero(shape, decay):
    # 25 steps an epoch; a warm-up of 10 steps, constant until step 40, down to 0 at step 60, the end.
    cooldown = dataclasses.replace(BASE, warmup_epochs=0.4, lr_schedule="cooldown", cooldown_start=40,
                                   cooldown_steps=20, cooldown_shape=shape, steps=60)
    constant = dataclasses.replace(BASE, warmup_epochs=0.4, steps=60)

    def lr(step, config=cooldown):
        return get_lr(step / 25, config, 60 / 25, step)

    for step in range(40):  # the warm-up and the peak: the constant schedule's rates, exactly
        assert lr(step) == lr(step, constant)
    assert lr(39) == lr(40) == 2e-4
    for step in range(40, 61):
        assert lr(step) == pytest.approx(2e-4 * decay((step - 40) / 20), rel=1e-12, abs=1e-20), step
    assert lr(50) == pytest.approx(2e-4 * (1 - 0.5 ** 0.5) if shape == "1-sqrt" else 1e-4)  # half-way
    assert lr(59) > 0 and lr(60) == 0 and lr(75) == 0  # the last step still learns; none is past the end
    values = [lr(step) for step in range(40, 61)]
    assert all(a > b for a, b in itertools.pairwise(values))


def test_cooldown_counts_steps_however_many_make_an_epoch():
    # 50,000 images, batch 32: an epoch is not a whole number of steps; the decay reads the step itself.
    config = dataclasses.replace(BASE, warmup_epochs=1.0, lr_schedule="cooldown", cooldown_start=123_457,
                                 cooldown_steps=9_999, cooldown_shape="linear", steps=133_456)
    for step in (123_456, 123_457, 123_458, 128_000, 133_455, 133_456):
        got = get_lr(step * 32 / 50_000, config, 133_456 * 32 / 50_000, step)
        assert got == 2e-4 * (1 - min(max(step - 123_457, 0) / 9_999, 1.0)), step
    with pytest.raises(ValueError, match="step"):
        get_lr(1.0, config, 2.0)


def test_ema_decay_warmup_and_lerp():
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(10**7, 0.9999) == 0.9999
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999  # an EMA that starts from trained weights
    net, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    expected = [0.9 * pe.detach() + 0.1 * pn.detach() for pe, pn in zip(ema.parameters(), net.parameters())]
    update_ema(ema, net, 0.9)
    for got, want in zip(ema.parameters(), expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_data_order_is_a_permutation_per_epoch_split_between_ranks():
    n, gb = 10, 4
    seen = torch.cat([batch_indices(step, gb, n, seed=1) for step in range(5)])  # 20 samples = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # a new order each epoch
    assert torch.equal(batch_indices(3, gb, n, seed=1), seen[12:16])  # a pure function of (seed, step)
    assert not torch.equal(batch_indices(0, gb, n, seed=2), seen[:4])
    rank0, rank1 = (torch.cat([batch_indices(s, gb, n, seed=1)[r * 2:(r + 1) * 2] for s in range(5)]) for r in (0, 1))
    assert set(rank0[:5].tolist()).isdisjoint(rank1[:5].tolist())


def test_dropout_masks_do_not_depend_on_the_split():
    x = torch.ones(4, 3, 5, 5)
    torch.manual_seed(7)
    whole = GlobalBatchDropout(0.3, rank=0, world_size=1)(x)
    parts = []
    for rank in (0, 1):
        torch.manual_seed(7)
        parts.append(GlobalBatchDropout(0.3, rank=rank, world_size=2)(x[rank * 2:(rank + 1) * 2]))
    assert torch.equal(torch.cat(parts), whole)
    kept = whole[whole != 0]
    assert 0 < len(kept) < whole.numel() and torch.allclose(kept, torch.full_like(kept, 1 / 0.7))
    assert torch.equal(GlobalBatchDropout(0.3, 0, 1).eval()(x), x)


def test_every_dropout_is_replaced():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.5)))
    use_global_batch_dropout(model, rank=1, world_size=2)
    drops = [m for m in model.modules() if isinstance(m, GlobalBatchDropout)]
    assert [d.p for d in drops] == [0.2, 0.5] and not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert all(d.rank == 1 and d.world_size == 2 for d in drops)
