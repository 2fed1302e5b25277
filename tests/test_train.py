"""The shared training loop (nanochat/train.py): handovers at step boundaries, resizes, offloaded evals."""
import json
import os

import torch

from nanochat.train import Eval, StepResult, WorkerContext, restore, run_loop


class Recorder(WorkerContext):
    """A context that offloads evals (results appear `lag` steps after their checkpoint, as from a task running
    beside training) and can ask for a handover at one step."""

    def __init__(self, lag=2, interrupt_at=None, **kwargs):
        super().__init__(**kwargs)
        self.lag, self.interrupt_at, self.submitted, self.handed_over, self.now = lag, interrupt_at, {}, [], 0

    def on_checkpoint(self, step, metrics, evaluate=()):
        if evaluate:
            self.submitted[step] = list(evaluate)

    def offloaded_results(self, steps, wait=False):
        return [(s, {"val_bpb": 10.0 - s}) for s in steps if wait or self.now >= s + self.lag]

    def interruption(self):
        return "grown" if self.now == self.interrupt_at else ""

    def hand_over(self, step, reason):
        self.handed_over.append((step, reason))


def run(ctx, num_iterations, loop_state=None):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def step_fn(step, state):
        ctx.now = step + 1
        return StepResult({"raw_loss": 1.0}, "", {"next": step + 1})
    inline = []
    evals = [Eval("val_bpb", 4, lambda step: inline.append(step) or {"val_bpb": 10.0 - step}, offload=True)]
    if loop_state is not None:
        loop_state = restore(ctx, loop_state, model, optimizer)[0]
    state = run_loop(model, optimizer, step_fn, num_iterations=num_iterations, ctx=ctx, evals=evals,
                     meta={}, loop_state=loop_state, loader_state={"next": 0})
    return state, inline


def lines(ctx):
    with open(ctx.metrics_path) as f:
        return [json.loads(line) for line in f]


def test_offloaded_evals_land_under_their_step(tmp_path):
    ctx = Recorder(offload_evals=True, checkpoint_dir=str(tmp_path), metrics_path=str(tmp_path / "m.jsonl"))
    state, inline = run(ctx, 12)
    assert inline == [0, 12]  # the first and the last step's evals stay on the training workers
    assert ctx.submitted == {4: ["val_bpb"], 8: ["val_bpb"]}
    evals = [(r["step"], r.get("offloaded", False)) for r in lines(ctx) if "val_bpb" in r]
    assert sorted(evals) == [(0, False), (4, True), (8, True), (12, False)]
    assert state.offloaded == [] and state.best_eval["val_bpb"] == -2.0
    assert os.path.exists(tmp_path / "meta_000004.json")  # each offloaded eval has its checkpoint


def test_pending_offloaded_evals_survive_a_handover(tmp_path):
    """The group hands over at step 5 with step 4's eval still running; the next group, restored from the step-5
    checkpoint, logs it when it arrives."""
    ctx = Recorder(lag=100, interrupt_at=5, offload_evals=True, checkpoint_dir=str(tmp_path),
                   metrics_path=str(tmp_path / "m.jsonl"))
    run(ctx, 12)  # this context's handover returns, so the loop goes on; a Ray group would be replaced there
    assert ctx.handed_over == [(5, "grown")]
    assert [r["step"] for r in lines(ctx) if r.get("handover") == "grown"] == [5]
    assert json.load(open(tmp_path / "meta_000005.json"))["loop_state"]["offloaded"] == [4]
    nxt = Recorder(lag=1, offload_evals=True, checkpoint_dir=str(tmp_path), metrics_path=str(tmp_path / "n.jsonl"),
                   world_size=1, restart_reason="grown")
    state, inline = run(nxt, 12, loop_state=5)
    assert (4, True) in [(r["step"], r.get("offloaded", False)) for r in lines(nxt) if "val_bpb" in r]
    assert state.offloaded == []
