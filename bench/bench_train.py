"""
Training throughput of one plain process (no Ray): forward+backward tokens/s and MFU.
MFU uses the spec peak on CUDA and the *measured* fp32 matmul peak on CPU, so the number is honest on any box.

    python bench/bench_train.py --depth 4 --device-batch-size 4 --seq-len 512
Last line printed is one JSON object with the numbers.
"""
import argparse
import json
import time

import torch

from nanochat import cuda_runtime
from nanochat.common import autodetect_device_type, get_peak_flops, measure_matmul_peak_flops
from nanochat.gpt import GPTConfig, build_model


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--device-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--optimizer", action="store_true", help="include the MuonAdamW step in the timing")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (GPU runs)")
    parser.add_argument("--device", default=autodetect_device_type())
    args = parser.parse_args()

    device = torch.device(args.device)
    config = GPTConfig.from_depth(args.depth, sequence_len=args.seq_len, vocab_size=args.vocab_size)
    model = build_model(config, device)
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
