"""lingua/step_check.py: non-finite updates skipped on the device, statistics read a step late."""

from __future__ import annotations

import pytest
import torch

from lingua.step_check import DeferredStepCheck, StepStats


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)


def _step(model, optimizer, check, step, scale):
    loss = model(torch.ones(2, 4)).sum() * scale
    loss.backward()
    check.arm(step, loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_a_non_finite_step_leaves_parameters_and_optimizer_state_alone():
    model, optimizer = _model_and_optimizer()
    check = DeferredStepCheck(optimizer, torch.device("cpu"))
    _step(model, optimizer, check, 1, 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in optimizer.state[model.weight].items()}
    _step(model, optimizer, check, 2, float("nan"))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(torch.equal(state[k], optimizer.state[model.weight][k]) for k in state)
    _step(model, optimizer, check, 3, float("inf"))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    _step(model, optimizer, check, 4, 1.0)
    assert not torch.equal(before[0], model.weight)
    assert optimizer.state[model.weight]["step"].item() == 2  # the two finite steps only


def test_statistics_come_back_a_step_late_unless_waited_for():
    model, optimizer = _model_and_optimizer()
    check = DeferredStepCheck(optimizer, torch.device("cpu"))
    assert check.finished() == [] and check.finished(wait_for_all=True) == []
    _step(model, optimizer, check, 1, 1.0)
    assert check.finished() == []  # the latest step stays pending
    _step(model, optimizer, check, 2, float("nan"))
    first = check.finished()
    assert [s.step for s in first] == [1] and first[0].finite and first[0].grad_norm > 0
    rest = check.finished(wait_for_all=True)
    assert [s.step for s in rest] == [2] and not rest[0].finite
    assert check.finished(wait_for_all=True) == []


def test_finite_means_both_numbers():
    assert StepStats(1, 2.0, 3.0).finite
    assert not StepStats(1, float("nan"), 3.0).finite and not StepStats(1, 2.0, float("inf")).finite


def test_an_optimizer_that_cannot_skip_on_the_device_is_refused():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="needs a fused optimizer"):
        DeferredStepCheck(torch.optim.AdamW(model.parameters(), foreach=True), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the pinned copy and its event")
def test_on_cuda_the_statistics_arrive_through_pinned_memory():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, device="cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    check = DeferredStepCheck(optimizer, torch.device("cuda"))
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for step, scale in enumerate([float("nan"), 1.0, 2.0], start=1):
        loss = model(torch.ones(2, 4, device="cuda")).sum() * scale
        losses.append(loss.item())
        loss.backward()
        check.arm(step, loss, torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1:
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    done = check.finished() + check.finished(wait_for_all=True)
    assert [s.step for s in done] == [1, 2, 3] and [s.finite for s in done] == [False, True, True]
    assert [s.loss for s in done[1:]] == pytest.approx(losses[1:])
    assert optimizer.state[model.weight]["step"].item() == 2
