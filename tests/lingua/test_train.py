"""The training loop: exact resume, preemption, crash-safe checkpoints, NaN guard, export."""

import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from lingua import train as train_module
from lingua.checkpoint import CheckpointManager, load_for_inference
from tests.lingua.train_helpers import read_losses, tiny_args, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "data")


RESUME_CASES = {
    "transformer": ("transformer", ()),
    # Random chunks are drawn from the global RNG, which checkpoints restore per rank.
    "attamba_random": ("attamba", ("model.chunk_strategy=random", "model.token_chunk=4", "model.state_dim=8")),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus, monkeypatch, case):
    model_type, model_overrides = RESUME_CASES[case]

    def args(run, *overrides):
        return tiny_args(run, corpus, *model_overrides, *overrides, model_type=model_type)

    straight = tmp_path / "straight"
    train_module.train(args(straight, "steps=8", "checkpoint.every=0"))

    # Preempt the second run at step 4 with a real SIGUSR1, then resume it to the end.
    resumed = tmp_path / "resumed"
    original_step = train_module.StepProfiler.step

    def preempt_at_4(self, global_step):
        original_step(self, global_step)
        if global_step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(train_module.StepProfiler, "step", preempt_at_4)
    summary = train_module.train(args(resumed, "steps=8", "checkpoint.every=0"))
    assert summary["preempted"] and summary["step"] == 4
    monkeypatch.setattr(train_module.StepProfiler, "step", original_step)
    summary = train_module.train(args(resumed, "steps=8", "checkpoint.every=0"))
    assert summary["step"] == 8 and summary["first_step"] == 4 and not summary["preempted"]

    expected, got = read_losses(straight), read_losses(resumed)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == expected[step], f"step {step}: {got[step]} != {expected[step]}"


def test_kill_during_checkpoint_write_leaves_previous_usable(tmp_path, corpus):
    run = tmp_path / "run"
    # A child trains with checkpoints every 2 steps and is SIGKILLed while writing the second.
    script = textwrap.dedent(
        f"""
        import os, signal
        import lingua.checkpoint as checkpoint
        from tests.lingua.train_helpers import tiny_args
        from lingua.train import train
        real_save = checkpoint.dcp.save
        calls = []
        def dying_save(state, checkpoint_id):
            calls.append(checkpoint_id)
            real_save(state, checkpoint_id=checkpoint_id)
            if len(calls) == 2:  # shards written, but the checkpoint is not committed yet
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.dcp.save = dying_save
        train(tiny_args({str(run)!r}, {str(corpus)!r}, "steps=6", "checkpoint.every=2"))
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpoints = run / "checkpoints"
    assert (checkpoints / ".tmp-0000000004").is_dir(), "the interrupted write should be left as .tmp"
    manager = CheckpointManager(checkpoints, tiny_args(run, corpus).checkpoint, None)
    assert manager.latest().name == "0000000002"

    summary = train_module.train(tiny_args(run, corpus, "steps=6", "checkpoint.every=2"))
    assert summary["step"] == 6
    assert not list(checkpoints.glob(".tmp-*")), "stale partial writes are cleaned up"
    assert [p.name for p in CheckpointManager.complete_checkpoints(checkpoints)] == ["0000000004", "0000000006"]


def test_non_finite_steps_are_skipped_then_stop(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(train_module, "cross_entropy", lambda logits, labels: logits.sum() * float("nan"))
    with pytest.raises(RuntimeError, match="3 non-finite steps"):
        train_module.train(tiny_args(tmp_path / "nan", corpus, "steps=5", "max_nan_steps=3"))
    assert CheckpointManager.complete_checkpoints(tmp_path / "nan" / "checkpoints"), "a checkpoint is saved on stop"


def _train_with_one_nan_step(run_dir, corpus, monkeypatch, *overrides) -> dict:
    calls = []

    def loss_nan_on_second_call(logits, labels):
        calls.append(1)
        loss = train_module.F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(train_module, "cross_entropy", loss_nan_on_second_call)
    return train_module.train(tiny_args(run_dir, corpus, "steps=4", *overrides))


def test_one_non_finite_step_is_skipped_and_training_goes_on(tmp_path, corpus, monkeypatch):
    # Logging at every step reads each step's statistics at once; at freq 100 they come a step late.
    for freq in (1, 100):
        summary = _train_with_one_nan_step(tmp_path / f"one_nan_{freq}", corpus, monkeypatch, f"logging.freq={freq}")
        assert summary["step"] == 4 and summary["nan_steps"] == 1
        assert math.isfinite(summary["loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: statistics through pinned memory, fused AdamW on the GPU")
def test_on_cuda_one_non_finite_step_is_skipped_and_training_goes_on(tmp_path, corpus, monkeypatch):
    summary = _train_with_one_nan_step(tmp_path / "cuda", corpus, monkeypatch, "device=cuda", "logging.freq=100",
                                       "distributed.compile=false")
    assert summary["step"] == 4 and summary["nan_steps"] == 1
    assert math.isfinite(summary["loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Triton KV-SSMs and attention, CUDA graphs")
def test_on_cuda_attamba_trains_compiled_whole_with_inductor_options(tmp_path, corpus):
    # The one-GPU setting of the 60M configs' comments: the whole model in one CUDA graph, Inductor's
    # combo kernels and realize_reads_threshold, bf16 autocast; its losses follow the eager run's.
    def run(name, *overrides):
        summary = train_module.train(tiny_args(
            tmp_path / name, corpus, "device=cuda", "steps=6", "distributed.model_dtype=bf16",
            "model.state_dim=16", "model.token_chunk=4", "model.leading_tokens=4", *overrides, model_type="attamba"))
        assert summary["step"] == 6 and summary["nan_steps"] == 0
        return read_losses(tmp_path / name)

    eager = run("eager", "distributed.compile=false")
    compiled = run("compiled", "distributed.compile=true", "distributed.compile_scope=model",
                   "distributed.compile_mode=reduce-overhead", "distributed.inductor_options.combo_kernels=true",
                   "distributed.inductor_options.realize_reads_threshold=8")
    assert compiled[1] == pytest.approx(eager[1], rel=1e-2)
    for step in range(2, 7):
        assert compiled[step] == pytest.approx(eager[step], rel=5e-2), step
    assert compiled[6] < compiled[1]


def test_export_loads_for_inference_and_matches(tmp_path, corpus):
    run = tmp_path / "run"
    train_module.train(tiny_args(run, corpus, "steps=2", "export_at_end=true", "grad_acc_steps=2"))
    tokens = torch.randint(0, 258, (1, 16))
    from_export, _ = load_for_inference(run / "export")
    from_checkpoint, args = load_for_inference(run)
    assert args.model.dim == 32
    with torch.no_grad():
        torch.testing.assert_close(from_export(tokens), from_checkpoint(tokens), rtol=0, atol=0)


def test_periodic_evaluation_survives_a_generation_task_on_a_sharded_model(tmp_path, corpus, monkeypatch, caplog):
    import lingua.eval
    from lingua import distributed

    def sharded_generation(*args, **kwargs):
        raise lingua.eval.GenerationUnderFSDPError("generation tasks cannot run on an FSDP-sharded model")

    monkeypatch.setattr(lingua.eval, "run_evaluation", sharded_generation)
    args = tiny_args(tmp_path / "run", corpus)
    env = distributed.DistEnv(0, 0, 1, torch.device("cpu"))
    evaluator = train_module._Evaluator(args, None, tmp_path / "run", env)
    assert evaluator.run(torch.nn.Linear(1, 1), 5) is None
    assert "step 5: evaluation skipped" in caplog.text


@pytest.mark.parametrize("model_type", ["transformer", "attamba"])
def test_periodic_evaluation_runs_compiled_blocks_eagerly(tmp_path, corpus, model_type):
    """Eval mode and evaluation's shapes would recompile every compiled block; evaluation runs
    them eagerly instead, with the same weights."""
    import math

    from torch._dynamo.utils import counters

    from lingua import distributed
    from lingua.registry import get_model_spec
    from lingua.tokenizer import build_tokenizer

    args = tiny_args(tmp_path / "run", corpus, "eval.tasks=[]", f"eval.val_sources={{held: {corpus}}}", "eval.batch_size=3",
                     model_type=model_type)
    torch.manual_seed(0)
    model = get_model_spec(model_type).build(args.model)
    model.init_weights()
    tokenizer = build_tokenizer(args.data.tokenizer)
    env = distributed.DistEnv(0, 0, 1, torch.device("cpu"))
    evaluator = train_module._Evaluator(args, tokenizer, tmp_path / "run", env)
    eager_ppl = evaluator.run(model, 1)["val/held/ppl"]

    for index, block in enumerate(model.layers):
        model.layers[index] = torch.compile(block, backend="eager", dynamic=False)
    model(torch.randint(0, args.model.vocab_size, (2, 32)))  # training-mode graphs
    graphs = counters["stats"]["unique_graphs"]
    ppl = evaluator.run(model, 2)["val/held/ppl"]
    assert counters["stats"]["unique_graphs"] == graphs, "evaluation compiled new graphs"
    assert math.isfinite(ppl) and ppl == pytest.approx(eager_ppl, rel=1e-5)


def test_cuda_graph_compile_mode_reaches_the_blocks_and_marks_every_micro_step(tmp_path, corpus, monkeypatch):
    from lingua import distributed

    modes, marks, dynamics, options = [], [], [], []

    def fake_compile(block, **kwargs):  # records what the loop asks for; runs the block eagerly
        modes.append(kwargs.get("mode"))
        dynamics.append(kwargs.get("dynamic"))
        options.append(kwargs.get("options"))
        return block

    monkeypatch.setattr(distributed.torch, "compile", fake_compile)
    monkeypatch.setattr(distributed.torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    args = tiny_args(tmp_path / "run", corpus, "steps=2", "grad_acc_steps=2", "checkpoint.every=0",
                     "distributed.compile=true", "distributed.compile_mode=reduce-overhead")
    train_module.train(args)
    # Every block with the asked mode, then the loss without CUDA graphs (distributed.compile_loss).
    assert modes == ["reduce-overhead"] * args.model.n_layers + [None]
    assert len(marks) == 2 * 2, "one mark before every micro-step's forward"
    assert dynamics == [False] * args.model.n_layers + [False], "static shapes unless compile_dynamic"
    modes.clear()
    dynamics.clear()
    args = tiny_args(tmp_path / "dynamic", corpus, "steps=1", "checkpoint.every=0", "distributed.compile=true",
                     "distributed.compile_dynamic=true")
    train_module.train(args)
    assert dynamics == [None] * args.model.n_layers + [False], "blocks dynamic; the loss stays static"
    modes.clear()
    args = tiny_args(tmp_path / "whole", corpus, "steps=1", "checkpoint.every=0", "distributed.compile=true",
                     "distributed.compile_scope=model", "distributed.compile_mode=reduce-overhead")
    train_module.train(args)
    assert modes == ["reduce-overhead", None], "one compile of the whole model, then the loss"
    # Inductor options: torch.compile takes a mode or options, so the mode comes in as its options.
    modes.clear()
    options.clear()
    args = tiny_args(tmp_path / "options", corpus, "steps=1", "checkpoint.every=0", "distributed.compile=true",
                     "distributed.compile_scope=model", "distributed.compile_mode=reduce-overhead",
                     "distributed.inductor_options.combo_kernels=true", "distributed.inductor_options.triton.unique_kernel_names=true")
    train_module.train(args)
    assert modes == [None, None]
    assert options == [
        {"triton.cudagraphs": True, "combo_kernels": True, "triton.unique_kernel_names": True},
        {"combo_kernels": True, "triton.unique_kernel_names": True},
    ], "the model's with the mode's CUDA graphs, the loss's without"
    default_mode = distributed.DistributedArgs(inductor_options={"combo_kernels": True})
    assert distributed.compile_settings(default_mode) == {"options": {"combo_kernels": True}}
    assert distributed.compile_settings(distributed.DistributedArgs()) == {"mode": None}
    with pytest.raises(ValueError, match=r"not settings of torch._inductor.config: \['combo_kernel'\]"):
        tiny_args(tmp_path / "bad", corpus, "distributed.inductor_options.combo_kernel=true")
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        tiny_args(tmp_path / "bad", corpus, "distributed.compile_mode=fast")
    with pytest.raises(ValueError, match="compile_scope must be one of"):
        tiny_args(tmp_path / "bad", corpus, "distributed.compile_scope=layer")


def test_a_whole_model_compile_is_refused_with_fsdp():
    from lingua import distributed

    args = distributed.DistributedArgs(parallelism="fsdp", compile=True, compile_scope="model")
    env = distributed.DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="compile_scope=block with fsdp"):
        distributed.parallelize_model(torch.nn.Linear(2, 2), args, env)


def test_the_compiled_loss_matches_the_eager_one_with_its_gradient():
    """distributed.compile_loss (inductor on this CPU) against the eager cross-entropy: bf16 logits
    as autocast gives them, some labels ignored (-100), values and logit gradients."""
    from lingua import distributed

    torch.manual_seed(0)
    logits = (torch.randn(3, 40, 300) * 4).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 300, (3, 40))
    labels[:, :5] = -100
    compiled = distributed.compile_loss(train_module.cross_entropy, distributed.DistributedArgs(compile=True))
    assert compiled is not train_module.cross_entropy
    eager_loss = train_module.cross_entropy(logits, labels)
    (eager_grad,) = torch.autograd.grad(eager_loss, logits)
    loss = compiled(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), eager_grad.float(), rtol=1e-2, atol=1e-5)
    assert not grad[:, :5].any(), "ignored positions get no gradient"
    assert distributed.compile_loss(train_module.cross_entropy, distributed.DistributedArgs()) is train_module.cross_entropy
    # Inductor really takes the options (an unknown one would fail the compile).
    with_options = distributed.DistributedArgs(compile=True, inductor_options={"realize_reads_threshold": 8})
    torch._dynamo.reset()
    loss = distributed.compile_loss(train_module.cross_entropy, with_options)(logits, labels)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("when", ["periodic", "final"])
def test_a_signal_during_evaluation_stops_it_at_the_next_batch(tmp_path, corpus, monkeypatch, when):
    """SIGUSR1 during a long evaluation: it stops before the next batch, writes no results, and
    the run saves a checkpoint and exits (instead of finishing the evaluation first)."""
    import lingua.data
    from lingua.tokenizer import build_tokenizer

    original = lingua.data.iter_eval_batches
    scored = []

    def signal_after_the_first_batch(*args, **kwargs):
        for index, batch in enumerate(original(*args, **kwargs)):
            scored.append(index)
            if index == 0:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield batch

    monkeypatch.setattr(lingua.data, "iter_eval_batches", signal_after_the_first_batch)
    schedule = ["eval_every=2"] if when == "periodic" else ["eval_at_end=true", "export_at_end=true"]
    run = tmp_path / "run"
    args = tiny_args(run, corpus, "steps=4", "checkpoint.every=0", "eval.tasks=[]", "eval.batch_size=1",
                     f"eval.val_sources={{held: {corpus}}}", *schedule)
    available = sum(1 for _ in original(str(corpus), build_tokenizer(args.data.tokenizer), 32, 1, None))
    assert available > 3, "the test needs an evaluation of several batches"

    summary = train_module.train(args)
    stop_step = 2 if when == "periodic" else 4
    assert summary["preempted"] and summary["step"] == stop_step
    # The signal arrives as the first batch is handed over: the check before scoring it stops.
    assert scored == [0], "no batch is drawn after the signal"
    assert not (run / "metrics.eval.jsonl").exists(), "an interrupted evaluation writes no results"
    saved = CheckpointManager.complete_checkpoints(run / "checkpoints")
    assert saved and saved[-1].name.endswith(str(stop_step))
    assert not (run / "export").exists()


def test_missing_evaluation_inputs_stop_the_run_before_training_with_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTAMBA_WIKITEXT_PATH", raising=False)
    argv = ["config=apps/attamba/configs/debug.yaml", f"dump_dir={tmp_path / 'run'}", "steps=2", "eval_every=1",
            "eval.tasks=[wikitext_local]", f"eval.wikitext_path={tmp_path / 'missing'}"]
    with pytest.raises(SystemExit) as stop:
        train_module.main(argv)
    assert str(stop.value.code).startswith("config error: WikiText-2 file not found")
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_update_clips_and_measures_the_gradients_of_every_parameter_group():
    from lingua.step_check import DeferredStepCheck
    from lingua.train import update

    weight, bias = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(3))
    # Two groups, as build_optimizer makes them (decayed weights, exempt biases).
    optimizer = torch.optim.AdamW([{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}], lr=0.1, fused=True)
    check = DeferredStepCheck(optimizer, torch.device("cpu"))
    weight.grad, bias.grad = torch.full((3, 4), 3.0), torch.full((3,), 4.0)
    norm = (12 * 9.0 + 3 * 16.0) ** 0.5
    clipped = {}
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: clipped.update(norm=torch.cat([weight.grad.flatten(), bias.grad]).norm().item()))
    update(optimizer, check, 1, torch.tensor(2.0), clip=1.0)
    assert clipped["norm"] == pytest.approx(1.0, rel=1e-4)  # both groups scaled together
    (stats,) = check.finished(wait_for_all=True)
    assert stats.grad_norm == pytest.approx(norm) and stats.loss == 2.0
    assert weight.grad is None and bias.grad is None


def test_a_model_compiled_whole_with_checkpointed_blocks_equals_the_eager_one():
    """compile_scope=model over blocks wrapped for activation checkpointing: one graph (fullgraph:
    no break), the same logits and gradients as the eager model."""
    from apps.main.model import TransformerArgs, TransformerLM
    from lingua import distributed

    torch.manual_seed(0)
    model = TransformerLM(TransformerArgs(dim=32, n_layers=2, n_heads=2, vocab_size=64, max_seqlen=16))
    model.init_weights()
    tokens = torch.randint(0, 64, (2, 16))
    expected = model(tokens)
    expected.square().mean().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    distributed._apply_activation_checkpointing(model, "full")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    distributed.compile_whole(model, backend="aot_eager", fullgraph=True)
    logits = model(tokens)
    logits.square().mean().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(logits, expected)
    for parameter, grad in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(parameter.grad, grad)
