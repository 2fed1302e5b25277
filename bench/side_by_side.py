"""
Time the same work in this checkout and in a nanochat checkout (karpathy/nanochat), side by side.

Both packages are called `nanochat`, so each runs in a worker process with its checkout first on the import path;
the two workers run one script (only the import path differs) and build their own GPT from one state dict. Each
"run" line on a worker's stdin answers with one JSON line: whatever the script measured. `alternate` times the
contenders in rounds, flipping their order every round, so drift on a shared machine hits every contender alike.
"""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The start of every worker script: `spec` (the JSON the bench wrote), `model` (this checkout's GPT: the bench's
# weights, or its own init after the spec's seed) and `reply(dict)`. nanochat prints while it sets up, so replies go
# to the original stdout only.
WORKER_PRELUDE = r"""
import json, sys, time, torch
from nanochat.gpt import GPT, GPTConfig
_replies, sys.stdout = sys.stdout, sys.stderr
def reply(out):
    _replies.write(json.dumps(out) + "\n")
    _replies.flush()
spec = json.load(open(sys.argv[1]))
torch.set_num_threads(spec["threads"])
torch.manual_seed(spec["seed"])
with torch.device("meta"):
    model = GPT(GPTConfig(**spec["config"]))
model.to_empty(device=spec["device"])
model.init_weights()  # the checkout's own initialization, or just the rotary buffers when weights are given
if spec["weights"]:
    model.load_state_dict(torch.load(spec["weights"], map_location=spec["device"]), strict=True)
def sync():
    if spec["device"] == "cuda":
        torch.cuda.synchronize()
"""

# the GPTConfig fields both checkouts have
SHARED_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


def write_spec(config, workdir, device, state_dict=None, seed=0, **extra):
    """Save the GPTConfig (plus `extra`) for the workers, and state_dict as the weights both load (without one, each
    worker initializes its own model after torch.manual_seed(seed)); returns the spec's path."""
    weights, spec_path = None, os.path.join(workdir, "spec.json")
    if state_dict is not None:
        weights = os.path.join(workdir, "weights.pt")
        torch.save(state_dict, weights)
    shared = {k: v for k, v in asdict(config).items() if k in SHARED_CONFIG_KEYS}
    with open(spec_path, "w") as f:
        json.dump(dict(config=shared, weights=weights, seed=seed, device=str(device), threads=torch.get_num_threads(),
                       **extra), f)
    return spec_path


class CheckoutWorker:
    """WORKER_PRELUDE + body, run with `checkout` first on the import path; run() sends one request."""

    def __init__(self, body, checkout, spec_path):
        checkout = os.path.abspath(os.path.expanduser(checkout))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER_PRELUDE + body, spec_path], cwd=checkout,
                                     env={**os.environ, "PYTHONPATH": checkout}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def run(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("a checkout worker died (see its stderr above)")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def alternate(contenders, rounds):
    """contenders: name -> fn() returning (output, seconds). One warm-up call each, then `rounds` timed calls in
    alternating order; an output that changes between calls is an error. Returns ({name: output}, {name: [s]})."""
    outputs, seconds = {}, {name: [] for name in contenders}
    for name, fn in contenders.items():
        outputs[name] = fn()[0]
    for r in range(rounds):
        order = list(contenders.items())
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            output, dt = fn()
            assert output == outputs[name], f"{name}: output changed between rounds"
            seconds[name].append(dt)
    return outputs, seconds
