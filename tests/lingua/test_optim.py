import math

import pytest

from lingua.optim import OptimArgs, lr_multiplier


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "constant", "wsd"])
def test_schedules_warm_up_then_end_where_expected(scheduler):
    args = OptimArgs(scheduler=scheduler, warmup=10, lr_min_ratio=0.01, decay_fraction=0.5)
    factors = [lr_multiplier(step, args, 100) for step in range(101)]
    assert all(a < b for a, b in zip(factors[:10], factors[1:11])), "warmup increases"
    assert math.isclose(factors[10], 1.0)
    end = 1.0 if scheduler == "constant" else 0.01
    assert math.isclose(factors[100], end, rel_tol=1e-9)
    if scheduler == "wsd":
        assert factors[49] == 1.0 and factors[75] < 1.0


def test_bad_scheduler_is_refused():
    with pytest.raises(ValueError, match="optim.scheduler"):
        OptimArgs(scheduler="triangle")


def test_parameters_marked_no_weight_decay_get_none():
    import torch

    from lingua.optim import build_optimizer

    model = torch.nn.Linear(2, 2)
    model.bias._no_weight_decay = True
    optimizer, _ = build_optimizer(model, OptimArgs(weight_decay=0.1), 10)
    decays = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decays[id(model.weight)] == 0.1 and decays[id(model.bias)] == 0.0
