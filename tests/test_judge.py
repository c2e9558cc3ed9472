import pytest
import torch

from cdiff.config import JudgeConfig
from cdiff.data import load_source
from cdiff.errors import CdiffError
from cdiff.judge import JUDGE_WEIGHTS, Judge, judge_backward, load_judge, predict, save_judge, train_judge
from cdiff.metrics import class_accuracy, fid


@pytest.fixture(scope="module")
def digits():
    return load_source("sklearn-digits", "train", 12, 1), load_source("sklearn-digits", "test", 12, 1)


@pytest.fixture(scope="module")
def judge(digits):
    return train_judge(
        digits[0], JudgeConfig(steps=300, batch_size=64, lr=5e-3, width=8, features=16), seed=0, progress=False
    )


def test_judge_learns_real_digits_and_its_features_separate_sets(judge, digits):
    train, test = digits
    feats, pred = predict(judge, test.as_float())
    assert feats.shape == (len(test), 16)
    assert class_accuracy(pred, test.labels, test.class_names).accuracy > 0.8
    real, _ = predict(judge, train.as_float())
    noise, _ = predict(judge, torch.rand(len(test), 1, 12, 12) * 2 - 1)
    assert fid(real, feats) * 5 < fid(noise, feats)  # real-vs-real is far closer than noise-vs-real


def test_judge_training_is_seeded(digits):
    cfg = JudgeConfig(steps=5, batch_size=16, width=4, features=8)
    a, b = (train_judge(digits[0], cfg, seed=3, progress=False) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_judge_round_trips_and_a_corrupt_file_is_refused(judge, digits, tmp_path):
    save_judge(judge, digits[0].class_names, tmp_path / "j", extra={"test_accuracy": 0.9})
    loaded, config = load_judge(tmp_path / "j")
    x = digits[1].as_float()[:8]
    assert torch.equal(loaded(x), judge(x)) and config["test_accuracy"] == 0.9
    (tmp_path / "j" / JUDGE_WEIGHTS).write_bytes(b"\x80\x04junk")
    with pytest.raises(CdiffError, match="not a valid safetensors"):
        load_judge(tmp_path / "j")


@pytest.mark.parametrize("micro", [4, 5])  # 5 does not divide 16: micro-batches of 5, 5, 5, 1
def test_judge_micro_batches_give_the_whole_batch_gradient(digits, micro):
    torch.manual_seed(0)
    judge = Judge(1, 10, JudgeConfig(width=4, features=8))
    x, y = digits[0].as_float()[:16], digits[0].labels[:16]
    grads, losses = [], []
    for m in (0, micro):
        judge.zero_grad(set_to_none=True)
        losses.append(judge_backward(judge, x, y, m).item())
        grads.append([p.grad.clone() for p in judge.parameters()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert all(g.abs().sum() > 0 for g in grads[0])  # every weight has a gradient to agree on
    for whole, parts in zip(*grads, strict=True):
        torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-6)
