"""The side-by-side bench harness (bench/side_by_side.py, which bench_train, bench_engine and paired_run share), run
with this checkout on both sides: the workers build the same model, so their outputs must agree exactly and the
timing must come back (the training step, the Engine's decode). The structured-outputs bench
(bench/bench_structured.py) on llguidance at a small vocab, and the serve bench's measure of what constrained rows
cost the free ones beside them."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(script, *args):
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), *args, "--compare-nanochat", REPO,
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_step_side_by_side():
    result = run_bench("bench_train.py", "--depth", "1", "--device-batch-size", "2", "--seq-len", "32",
                       "--vocab-size", "512", "--steps", "2", "--rounds", "1")
    assert result["first_loss_rel_diff"] == 0.0  # same code, weights, batch and learning rates
    assert result["ours_ms"] > 0 and result["nanochat_ms"] > 0 and result["vs_nanochat"] > 0


def test_engine_decode_side_by_side():
    """Our Engine in a worker (with the bench's stand-in tokenizer) beside the in-process Engine and scheduler."""
    result = run_bench("bench_engine.py", "--depth", "1", "--seq-len", "32", "--vocab-size", "512",
                       "--tokenizer-vocab", "300", "--new-tokens", "8", "--num-samples", "2", "--rounds", "1")
    assert result["outputs_identical"] and result["scheduler_identical"] and result["nanochat_identical"]
    assert result["ours_worker_tok_per_sec"] > 0 and result["nanochat_worker_tok_per_sec"] > 0


def test_paired_run_from_each_sides_own_initialization():
    out = subprocess.run([sys.executable, os.path.join(REPO, "bench", "paired_run.py"), "--compare-nanochat", REPO,
                          "--num-iterations", "3", "--vocab-size", "300"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["first_losses_ours"]) == 3 and result["first10_max_rel_diff"] == 0.0
    assert result["val_rel_diff"] == 0.0 and result["val_loss_is_finite"]


def test_structured_bench_measures_llguidance():
    out = subprocess.run([sys.executable, "-m", "bench.bench_structured", "--vocab-sizes", "512", "--libraries",
                          "llguidance", "--seeds", "1", "--random-tokens", "16", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])["512"]
    for case in ("person", "order", "json_object"):
        assert result["llguidance"][case]["mask_doc_us"]["n"] > 20  # every token of the document was masked
        assert result["llguidance"][case]["compile_ms"] > 0
    assert result["serve.structured_apply_us"]["p50"] > 0


def test_serve_bench_measures_free_rows_beside_constrained_ones():
    out = subprocess.run([sys.executable, "-m", "bench.bench_serve", "--constrained", "1", "--streams", "1",
                          "--rounds", "1", "--max-tokens", "24", "--depth", "1", "--vocab-size", "512",
                          "--device", "cpu"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["itl_ms_beside_free"] > 0 and result["itl_ms_beside_constrained"] > 0 and result["slowdown"] > 0
