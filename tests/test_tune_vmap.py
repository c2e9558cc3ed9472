"""bench/tune_vmap.py's vmapped trials: the same training as each trial alone, so that its timing compares like
with like (issue 16: Tune's trials packed on one device against one vmapped step)."""

import pytest

import bench.tune_vmap as tv
from cdiff.config import DiffusionConfig
from tests.conftest import tiny_config

# torch has no vmap rule for the CPU's attention kernel (it loops over the trials): said, not a failure
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

TRIALS = [tv.Trial(1, 0.5, 3e-3), tv.Trial(2, 4.0, 1e-2), tv.Trial(4, 4.0, 5e-3)]  # ranks, alphas and lrs differ


def setup() -> tv.Setup:
    return tv.Setup(tiny_config(), DiffusionConfig(timesteps=50), ("w_q", "w_k", "w_v"), 4, 0.01, 1.0, 0.2)


def test_vmapped_trials_of_different_ranks_train_as_each_trial_alone():
    assert tv.check_same_training(setup(), TRIALS, steps=3) <= 1e-4


def test_the_check_refuses_trials_stacked_with_the_wrong_scaling(monkeypatch):
    monkeypatch.setattr(tv, "lora_scaling", lambda r, alpha: 1.0)  # every trial's alpha/r taken as 1
    with pytest.raises(AssertionError, match="train unlike the trials alone"):
        tv.check_same_training(setup(), TRIALS, steps=3)


def test_the_check_refuses_trials_stacked_with_one_learning_rate(monkeypatch):
    one_lr = [tv.Trial(t.r, t.alpha, TRIALS[0].lr) for t in TRIALS]

    class Mixed(tv.Stacked):  # the stack trains at one lr while the trials alone keep their own
        def __init__(self, s, trials):
            super().__init__(s, one_lr)

    monkeypatch.setattr(tv, "Stacked", Mixed)
    with pytest.raises(AssertionError, match="train unlike the trials alone"):
        tv.check_same_training(setup(), TRIALS, steps=3)
