"""
Expected base-training time and cost of a speedrun preset, computed (not measured) from the model the preset
builds: training FLOPs per token (GPT.estimate_flops) x the tokens its horizon derives, over the cluster's peak
throughput at an assumed MFU. Base training is the bulk of a run; nanochat's own d20 runs spend roughly 3/4 of
their time there, so the whole pipeline takes about --overhead times this.

    python bench/preset_cost.py [--preset d20] [--gpus 8] [--peak-tflops 989] [--mfu 0.45] [--usd-per-gpu-hour 3]
Last line: one JSON object.
"""
import argparse
import json

import torch


from nanochat.base_train import BaseTrainConfig, batch_hyperparameters, model_config
from nanochat.gpt import GPT
from ray_jobs.speedrun import PRESETS


def preset_estimate(preset, vocab_size, gpus, peak_flops, mfu, usd_per_gpu_hour, overhead):
    flags = {k.replace("-", "_"): v for k, v in PRESETS[preset]["base_train"].items()}
    cfg = BaseTrainConfig(**{k: v for k, v in flags.items() if k in BaseTrainConfig.__dataclass_fields__})
    config = model_config(cfg, vocab_size)
    with torch.device("meta"):
        flops_per_token = GPT(config).estimate_flops()
    hp = batch_hyperparameters(cfg, vocab_size)
    total_flops = flops_per_token * hp["total_tokens"]
    base_hours = total_flops / (gpus * peak_flops * mfu) / 3600
    return {"preset": preset, "depth": cfg.depth, "n_embd": config.n_embd,
            "scaling_params": hp["num_scaling_params"], "steps": hp["num_iterations"],
            "tokens": hp["total_tokens"], "flops_per_token": flops_per_token, "total_flops": total_flops,
            "base_train_hours": round(base_hours, 2), "pipeline_hours": round(base_hours * overhead, 2),
            "pipeline_usd": round(base_hours * overhead * gpus * usd_per_gpu_hour)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="default: d20 and d24")
    parser.add_argument("--vocab-size", type=int, default=32768, help="the tokenizer's (tok_train default)")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--peak-tflops", type=float, default=989, help="per GPU, bf16 dense (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.45, help="assumed model FLOPs utilization")
    parser.add_argument("--usd-per-gpu-hour", type=float, default=3.0, help="8xH100 at ~$24/h = $3 per GPU-hour")
    parser.add_argument("--overhead", type=float, default=1.33, help="whole pipeline / base training time")
    args = parser.parse_args()
    rows = [preset_estimate(p, args.vocab_size, args.gpus, args.peak_tflops * 1e12, args.mfu,
                            args.usd_per_gpu_hour, args.overhead) for p in args.preset or ["d20", "d24"]]
    for r in rows:
        print(f"{r['preset']}: depth {r['depth']} width {r['n_embd']}, {r['scaling_params'] / 1e6:.0f}M scaling "
              f"params, {r['steps']} steps, {r['tokens'] / 1e9:.1f}B tokens, {r['total_flops']:.2e} FLOPs -> base "
              f"train {r['base_train_hours']} h, pipeline ~{r['pipeline_hours']} h, ~${r['pipeline_usd']} on "
              f"{args.gpus} GPUs at MFU {args.mfu}")
    print(json.dumps({"gpus": args.gpus, "peak_tflops": args.peak_tflops, "mfu": args.mfu, "presets": rows}))


if __name__ == "__main__":
    main()
