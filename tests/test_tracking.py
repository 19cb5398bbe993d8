"""Training logs: CSV and TensorBoard through fit's callback, without changing training."""

import csv
import itertools
import math

import pytest
import torch
from torch import nn

from pyrolora import BayesianLoraModel, LoraXSConfig, fit, guides, inject_adapters, likelihoods
from pyrolora.errors import ConfigError
from pyrolora.inference.guides import setup
from pyrolora.runs.config import RunConfig
from pyrolora.runs.tracking import CSV_NAME, TENSORBOARD_DIR, TrainingLogger, kl_estimate, learning_rates


def _regression(n=64, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    adapters = inject_adapters(net, LoraXSConfig(rank=2, target_modules=["0"]))
    model = BayesianLoraModel(net, adapters, dataset_size=n, likelihood=likelihoods.Gaussian(0.1), head=())
    x = torch.randn(n, 3)
    with torch.no_grad(), adapters.use({"0": torch.randn(2, 2)}):
        y = net(x).squeeze(-1) + 0.1 * torch.randn(n)
    return model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


SETTINGS = {"lr": 0.05, "head_lr": 1e-3, "warmup": 0.1, "schedule": "cosine"}


def _fit(model, guide, data, steps, callback=None):
    return fit(model, guide, data, num_steps=steps, seed=3, progress=False, callback=callback, **SETTINGS)


def _read(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_logging_leaves_training_unchanged_and_records_every_step(tmp_path):
    model, data = _regression()
    plain = _fit(model, guides.make("lowrank", model), data, 12)
    model, data = _regression()
    guide = guides.make("lowrank", model)
    rates = learning_rates(SETTINGS["lr"], SETTINGS["head_lr"], num_steps=12, warmup=0.1, schedule="cosine")
    with TrainingLogger(tmp_path, model, guide, csv=True, rates=rates, steps_per_epoch=4) as log:
        logged = _fit(model, guide, data, 12, callback=log)
    assert logged.losses == plain.losses  # the KL draws run on a forked RNG: bit-identical training
    rows = _read(tmp_path / CSV_NAME)
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert [float(r["loss"]) for r in rows] == logged.losses  # repr round trip of Python floats is exact
    assert [float(r["elbo"]) for r in rows] == [-x for x in logged.losses]
    assert [float(r["lr"]) for r in rows] == logged.learning_rates  # the replayed schedule is fit's schedule
    assert float(rows[3]["epoch"]) == 1.0 and float(rows[-1]["epoch"]) == 3.0
    kls = [float(r["kl"]) for r in rows]  # one-draw estimates: noisy (checked against the closed form below)
    assert all(math.isfinite(k) for k in kls) and len(set(kls)) == len(kls)  # a fresh draw at every step
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_every_nth_step_and_validation_columns(tmp_path):
    model, data = _regression()
    guide = guides.make("diagonal", model)
    calls = []

    def validate():
        calls.append(len(calls))
        return {"rmse": 0.5 + len(calls)}

    log = TrainingLogger(tmp_path, model, guide, every=3, validate=validate, validation_every=4, num_steps=10)
    _fit(model, guide, data, 10, callback=log)  # the logger closes itself after the last step
    rows = _read(tmp_path / CSV_NAME)
    assert [int(r["step"]) for r in rows] == [1, 4, 7, 10]  # every 3rd step and the last
    assert [r["val_rmse"] for r in rows] == ["", "1.5", "", "2.5"]  # steps 4 and 10 (8 is not a logged step)
    assert rows[0]["lr"] == ""  # no schedule given: the column stays empty


def test_tensorboard_events_hold_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is a declared dependency; this guards a broken install")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, data = _regression()
    guide = guides.make("lowrank", model)
    rates = learning_rates(SETTINGS["lr"], SETTINGS["head_lr"], num_steps=6, warmup=0.1, schedule="cosine")
    with TrainingLogger(
        tmp_path, model, guide, csv=False, tensorboard=True, rates=rates, validate=lambda: {"acc": 0.75}
    ) as log:
        result = _fit(model, guide, data, 6, callback=log)
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/elbo", "train/kl", "train/lr", "train/head_lr", "val/acc"} <= tags
    elbo = [(e.step, e.value) for e in events.Scalars("train/elbo")]
    assert [s for s, _ in elbo] == list(range(1, 7))
    # TensorBoard stores float32: compare at float32 resolution of the loss (about 1e-7 relative)
    assert [v for _, v in elbo] == pytest.approx([-x for x in result.losses], rel=1e-6)
    assert [e.step for e in events.Scalars("val/acc")] == [6]  # validation only at the last step by default
    assert not (tmp_path / CSV_NAME).exists()


def test_kl_estimate_matches_the_closed_form():
    model, _ = _regression()
    guide = guides.make("lowrank", model)
    setup(guide, model)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(0.05 * torch.randn_like(p))
    q = guide.get_posterior()
    d = q.loc.shape[-1]
    prior = torch.distributions.LowRankMultivariateNormal(torch.zeros(d), torch.zeros(d, 1), torch.full((d,), 0.01))
    exact = torch.distributions.kl_divergence(q, prior).item()
    state = torch.get_rng_state()
    estimate = kl_estimate(model, guide, num_particles=400, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    # the log-ratio's standard deviation here is 1.3 nats (measured): 400 draws give a standard error of 0.065,
    # and 0.3 is more than four of them
    assert estimate == pytest.approx(exact, abs=0.3)
    assert exact > 2.0  # a real divergence (2.86), so a sign or factor-of-two error would show


@pytest.mark.parametrize(("schedule", "warmup"), list(itertools.product(["cosine", "linear", "constant"], [0.2, 3])))
def test_replayed_learning_rates_equal_fit(schedule, warmup):
    model, data = _regression()
    result = fit(
        model, guides.make("delta", model), data, num_steps=15, lr=0.1, head_lr=0.01, warmup=warmup,
        schedule=schedule, progress=False,
    )  # fmt: skip
    rates = learning_rates(0.1, 0.01, num_steps=15, warmup=warmup, schedule=schedule)
    assert [r[0] for r in rates] == result.learning_rates
    assert [r[1] for r in rates] == pytest.approx([0.1 * r[0] for r in rates])  # one schedule scales both groups


def test_log_section_of_the_run_config():
    config = RunConfig.from_dict({"log": {"csv": True, "tensorboard": True, "validation_every": 50}})
    assert config.log.csv and config.log.tensorboard and config.log.validation_every == 50
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_dict({}).log.csv is False  # old run folders without [log] still load; logs are opt-in
    with pytest.raises(ConfigError, match=r"log\.every"):
        RunConfig.from_dict({"log": {"every": 0}})
    with pytest.raises(ConfigError, match="unknown key"):
        RunConfig.from_dict({"log": {"wandb": True}})


def test_bad_logger_settings_are_config_errors(tmp_path):
    model, _ = _regression()
    with pytest.raises(ConfigError, match=r"log\.every"):
        TrainingLogger(tmp_path, model, guides.make("delta", model), every=0)
