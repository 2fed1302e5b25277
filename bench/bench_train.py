"""
Training throughput of one plain process (no Ray): forward+backward tokens/s and MFU.
MFU uses the spec peak on CUDA and the *measured* fp32 matmul peak on CPU, so the number is honest on any box.

With --compare-nanochat DIR (a checkout of karpathy/nanochat): one training step (forward, backward, MuonAdamW,
zero_grad) of our GPT and optimizer against nanochat's own, on the same weights, batch and learning rates, each in a
worker process (see side_by_side.py), rounds alternated; prints the ratio and both runs' losses.

    python bench/bench_train.py --depth 4 --device-batch-size 4 --seq-len 512
    python bench/bench_train.py --depth 4 --device-batch-size 16 --seq-len 256 --compare-nanochat ~/nanochat
Last line printed is one JSON object with the numbers.
"""
import argparse
import json
import statistics
import tempfile
import time

import torch

from nanochat import cuda_runtime
from nanochat.common import autodetect_device_type, get_peak_flops, measure_matmul_peak_flops
from nanochat.gpt import GPTConfig, build_model
from side_by_side import REPO, CheckoutWorker, alternate, write_spec

# The worker's body (after side_by_side.WORKER_PRELUDE): each request times spec["steps"] training steps of the
# checkout's own model and optimizer (nanochat's optimizer compiles its fused steps on first use: the warm-up).
TRAIN_WORKER = r"""
opt = model.setup_optimizer(**spec["optimizer"])
gen = torch.Generator().manual_seed(0)
shape = (spec["batch"], spec["seq_len"])
x, y = (torch.randint(0, spec["config"]["vocab_size"], shape, generator=gen).to(spec["device"]) for _ in range(2))
for line in sys.stdin:
    losses = []
    sync()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())  # as a training loop logs it
    sync()
    reply({"seconds": (time.perf_counter() - t0) / spec["steps"], "losses": losses})
"""
# the learning rates both workers use (the two checkouts' setup_optimizer defaults differ)
OPTIMIZER_LRS = dict(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5)


def compare_nanochat(model, args):
    """Our training step against nanochat's, alternated: (our step rate / nanochat's, {name: [seconds]}, losses)."""
    with tempfile.TemporaryDirectory() as workdir:
        spec = write_spec(model.config, workdir, args.device, model.state_dict(), optimizer=OPTIMIZER_LRS,
                          batch=args.device_batch_size, seq_len=args.seq_len, steps=args.steps)
        workers = {name: CheckoutWorker(TRAIN_WORKER, checkout, spec)
                   for name, checkout in (("ours", REPO), ("nanochat", args.compare_nanochat))}
        # each round's losses continue training, so only the seconds are compared between rounds
        losses = {name: [] for name in workers}

        def contender(name):
            out = workers[name].run()
            losses[name].append(out["losses"])
            return None, out["seconds"]
        try:
            _, seconds = alternate({name: lambda name=name: contender(name) for name in workers}, args.rounds)
        finally:
            for worker in workers.values():
                worker.close()
    # rounds are paired (run back to back), so the geometric mean of per-round ratios cancels slow drift of the box
    ratio = statistics.geometric_mean([n / o for n, o in zip(seconds["nanochat"], seconds["ours"])])
    return ratio, seconds, {name: runs[0] for name, runs in losses.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4, help="model depth (sets the width)")
    parser.add_argument("--device-batch-size", type=int, default=4, help="rows per step")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row")
    parser.add_argument("--vocab-size", type=int, default=32768, help="model vocabulary")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (per round with --compare-nanochat)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--optimizer", action="store_true", help="include the MuonAdamW step in the timing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU runs)")
    parser.add_argument("--rounds", type=int, default=5, help="--compare-nanochat: timed rounds of each side")
    parser.add_argument("--compare-nanochat", default=None, metavar="DIR",
                        help="a nanochat checkout: time its training step against ours (model + optimizer)")
    parser.add_argument("--device", default=autodetect_device_type(), help="cpu | cuda | mps")
    args = parser.parse_args()

    device = torch.device(args.device)
    config = GPTConfig.from_depth(args.depth, sequence_len=args.seq_len, vocab_size=args.vocab_size)
    model = build_model(config, device)
    if args.compare_nanochat:
        ratio, seconds, losses = compare_nanochat(model, args)
        for name, s in seconds.items():
            print(f"{name}: ms/step per round {[round(x * 1000, 1) for x in s]}; first losses {losses[name][:3]}")
        result = dict(bench="train_step_vs_nanochat", device=str(device), depth=args.depth,
                      batch=args.device_batch_size, seq_len=args.seq_len, rounds=args.rounds,
                      steps_per_round=args.steps,
                      ours_ms=round(statistics.median(seconds["ours"]) * 1000, 1),
                      nanochat_ms=round(statistics.median(seconds["nanochat"]) * 1000, 1), vs_nanochat=round(ratio, 3),
                      first_loss_rel_diff=abs(losses["ours"][0] - losses["nanochat"][0]) / losses["nanochat"][0])
        print(f"training step: ours {result['ours_ms']} ms, nanochat's {result['nanochat_ms']} ms (medians); "
              f"ours {ratio:.3f}x (geometric mean of the rounds' ratios)")
        print(json.dumps(result))
        return
    opt = model.setup_optimizer() if args.optimizer else None
    fwd = torch.compile(model, dynamic=False) if args.compile else model
    B, T = args.device_batch_size, args.seq_len
    x = torch.randint(0, args.vocab_size, (B, T), device=device)
    y = torch.randint(0, args.vocab_size, (B, T), device=device)
    def sync():
        cuda_runtime.synchronize(device)

    def step():
        loss = fwd(x, y)
        loss.backward()
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps

    tok_per_sec = B * T / dt
    flops_per_token = model.estimate_flops()
    if device.type == "cuda":
        peak, peak_source = get_peak_flops(torch.cuda.get_device_name(device)), torch.cuda.get_device_name(device)
    else:
        peak, peak_source = measure_matmul_peak_flops(device, n=2048, iters=5), "measured fp32 matmul (2048^3)"
    achieved = flops_per_token * tok_per_sec
    result = dict(bench="train_step", device=str(device), depth=args.depth, n_embd=config.n_embd,
                  n_params=model.num_scaling_params()["total"], batch=B, seq_len=T, optimizer=args.optimizer,
                  step_ms=round(dt * 1000, 1), tok_per_sec=round(tok_per_sec, 1),
                  flops_per_token=flops_per_token, achieved_tflops=round(achieved / 1e12, 4),
                  peak_tflops=round(peak / 1e12, 4), peak_source=peak_source,
                  mfu_pct=round(100 * achieved / peak, 2))
    print(f"depth {args.depth}: {result['step_ms']} ms/step, {result['tok_per_sec']:,.0f} tok/s, "
          f"{result['achieved_tflops']} TFLOP/s of {result['peak_tflops']} peak -> MFU {result['mfu_pct']}%")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
