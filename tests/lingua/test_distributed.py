"""Two processes on gloo (DDP and FSDP2) match one process on the same global batch, and the
full training loop runs, checkpoints and resumes under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "lingua" / "dist_worker.py"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    result = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single.json"
    subprocess.run([sys.executable, str(WORKER), str(single), "none"], cwd=ROOT, env=_env(), check=True, timeout=120)
    expected = json.loads(single.read_text())
    for parallelism in ("ddp", "fsdp"):
        out = tmp_path / f"{parallelism}.json"
        _torchrun(str(WORKER), str(out), parallelism)
        got = json.loads(out.read_text())
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), parallelism
    assert expected[-1] < expected[0], "the steps train"
    # DDP around a model compiled whole (distributed.compile_scope=model; Inductor on this CPU,
    # whose fused kernels may round differently from the eager ones).
    out = tmp_path / "ddp_whole.json"
    _torchrun(str(WORKER), str(out), "ddp", "model")
    assert json.loads(out.read_text()) == pytest.approx(expected, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_training_loop_under_torchrun_with_fsdp_checkpoints_and_resumes(tmp_path):
    from tests.lingua.train_helpers import write_corpus

    corpus = write_corpus(tmp_path / "data")
    run = tmp_path / "run"
    common = [
        "-m", "apps.main.train", f"dump_dir={run}", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
        "model.vocab_size=258", "model.max_seqlen=32", f"data.sources={{{corpus}: 1.0}}", "data.seq_len=32", "data.batch_size=2",
        "logging.freq=1", "eval_at_end=false", "device=cpu", "distributed.parallelism=fsdp",
    ]
    _torchrun(*common, "steps=2")
    assert (run / "checkpoints" / "0000000002" / "train_state_1.pt").exists()
    assert (run / "export" / "model.safetensors").exists()
    _torchrun(*common, "steps=4", "export_at_end=false")
    steps = [json.loads(line)["global_step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "the second launch resumed at step 2"


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_periodic_evaluation_under_torchrun_matches_one_process(tmp_path, parallelism):
    from lingua.eval import EvalArgs, EvalRunArgs, load_model, run_evaluation
    from tests.lingua.test_eval import write_wikitext
    from tests.lingua.train_helpers import write_corpus

    corpus = write_corpus(tmp_path / "data")
    held = write_corpus(tmp_path / "held", documents=12, seed=1)
    wiki = write_wikitext(tmp_path / "wiki.test.tokens")
    run = tmp_path / "run"
    _torchrun(
        "-m", "apps.main.train", f"dump_dir={run}", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
        "model.vocab_size=258", "model.max_seqlen=32", f"data.sources={{{corpus}: 1.0}}", "data.seq_len=32",
        "data.batch_size=2", "steps=4", "eval_every=2", "eval_at_end=true", "device=cpu",
        f"distributed.parallelism={parallelism}", f"eval.val_sources={{held: {held}}}", "eval.batch_size=2", "eval.tasks=[wikitext_local]", f"eval.wikitext_path={wiki}",
        "eval.val_max_batches=5",  # odd: the second rank's last round repeats a batch with weight 0
    )
    records = [json.loads(line) for line in (run / "metrics.eval.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records] == [2, 4], "one record per evaluation (rank 0 writes)"
    # The last evaluation saw the final weights: the same number as one process evaluating the export.
    eval_args = EvalArgs(
        tasks=["wikitext_local"], wikitext_path=str(wiki), val_sources={"held": str(held)}, batch_size=2, val_max_batches=5
    )
    model, tokenizer, _ = load_model(EvalRunArgs(ckpt=str(run), device="cpu", eval=eval_args))
    expected = run_evaluation(model, tokenizer, eval_args, 4, None)
    assert records[-1]["val/held/ppl"] == pytest.approx(expected["val/held/ppl"], rel=1e-4)
    word_perplexity = "word_perplexity,none"
    assert records[-1]["wikitext_local"][word_perplexity] == pytest.approx(expected["wikitext_local"][word_perplexity], rel=1e-4)


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    from tests.lingua.train_helpers import write_corpus

    corpus = write_corpus(tmp_path / "data")
    run = tmp_path / "run"
    result = _torchrun(
        str(ROOT / "tests" / "lingua" / "preempt_worker.py"), f"dump_dir={run}", "model.dim=32", "model.n_layers=2",
        "model.n_heads=2", "model.vocab_size=258", "model.max_seqlen=32", f"data.sources={{{corpus}: 1.0}}",
        "data.seq_len=32", "data.batch_size=2", "steps=6", "logging.freq=1", "eval_at_end=false",
        "export_at_end=false", "device=cpu", "distributed.parallelism=fsdp",
    )
    assert "rank 0 stopped at step 2 preempted=True" in result.stdout
    assert "rank 1 stopped at step 2 preempted=True" in result.stdout
    assert sorted(p.name for p in (run / "checkpoints" / "0000000002").glob("train_state_*.pt")) == ["train_state_0.pt", "train_state_1.pt"]


@pytest.mark.slow
def test_ranks_share_out_the_lm_eval_forward_passes(tmp_path):
    worker = str(ROOT / "tests" / "lingua" / "eval_worker.py")
    subprocess.run([sys.executable, worker, str(tmp_path / "one"), "none"], cwd=ROOT, env=_env(), check=True, timeout=120)
    expected = json.loads((tmp_path / "one.0.json").read_text())
    assert expected["passes"] == 5
    _torchrun(worker, str(tmp_path / "two"), "fsdp")
    for rank in (0, 1):
        got = json.loads((tmp_path / f"two.{rank}.json").read_text())
        # Every rank returns every score; each made 3 passes (one of them idle on rank 1).
        assert got["scores"] == pytest.approx(expected["scores"], rel=1e-5), rank
        assert got["passes"] == 3, rank


@pytest.mark.slow
def test_ranks_share_out_the_lm_eval_generation_batches(tmp_path):
    worker = str(ROOT / "tests" / "lingua" / "eval_worker.py")
    subprocess.run([sys.executable, worker, str(tmp_path / "one"), "none", "generate"], cwd=ROOT, env=_env(), check=True, timeout=120)
    expected = json.loads((tmp_path / "one.0.json").read_text())
    assert expected["batches"] == 5 and len(expected["texts"]) == 5
    _torchrun(worker, str(tmp_path / "two"), "ddp", "generate")
    generated = []
    for rank in (0, 1):
        got = json.loads((tmp_path / f"two.{rank}.json").read_text())
        assert got["texts"] == expected["texts"], rank  # every rank returns every text, in order
        generated.append(got["batches"])
    assert generated == [3, 2]
