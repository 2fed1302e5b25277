"""
A paired training run against nanochat: same data, flags and seed, each checkout starting from its OWN
initialization (torch.manual_seed(seed), then its GPT's init_weights) and training with its own model and MuonAdamW.

The base_train flags are the demo preset's (depth 4 at half width, T=256, 2048-token steps, its learning rates);
batch size, learning-rate scale and weight decay come from our derive_hyperparameters, and the per-step lr,
momentum and weight-decay values from our schedules, handed to both workers (nanochat's own schedule functions live
inside its training script; tests/test_schedules.py checks ours against them). The batches are packed once by our
BestFitPacker and handed to both. Text: Python's bundled documentation by default, or --text (a .txt, .txt.gz or a
.jsonl.gz with a "text" field), split into paragraphs; the last 10% of paragraphs are held out. The tokenizer is
trained on the training paragraphs (offline).

    python bench/paired_run.py --compare-nanochat ~/nanochat --num-iterations 300
Prints the first losses of both, their largest relative difference, and the held-out loss of both
(bits per byte differ from it by a factor shared by both runs). Last line: one JSON object.
"""
import argparse
import gzip
import json
import math
import tempfile

import pydoc_data.topics
import torch

from nanochat.base_train import BaseTrainConfig, batch_hyperparameters, model_config, optimizer_args
from nanochat.dataloader import BestFitPacker
from nanochat.presets import PRESETS, to_argv
from nanochat.schedules import lr_multiplier, muon_momentum, muon_weight_decay
from nanochat.tokenizer import RustBPETokenizer
from side_by_side import REPO, CheckoutWorker, write_spec

# The worker's body (after side_by_side.WORKER_PRELUDE, which built `model` from spec["seed"] and init_weights):
# one request trains through every batch with the given schedule, then measures the held-out loss.
PAIRED_WORKER = r"""
opt = model.setup_optimizer(**spec["optimizer"])
data = torch.load(spec["batches"])
for line in sys.stdin:
    losses = []
    for (x, y), (lrm, momentum, weight_decay) in zip(data["train"], data["schedule"]):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = momentum, weight_decay
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        val = [model(x, y).item() for x, y in data["val"]]
    reply({"losses": losses, "val_loss": sum(val) / len(val)})
"""


def read_paragraphs(path):
    """Paragraphs (blank-line separated) of the corpus; the default is Python's bundled documentation."""
    if path is None:
        texts = list(pydoc_data.topics.topics.values())
    elif path.endswith(".jsonl.gz"):
        with gzip.open(path, "rt") as f:
            texts = [json.loads(line)["text"] for line in f]
    else:
        with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
            texts = [f.read()]
    return [p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) > 20]


def batches(tokenizer, paragraphs, B, T, count):
    """count (x, y) batches of B rows packed from the paragraphs (cycled), or as many as one pass gives if count is
    None."""
    bos = tokenizer.get_bos_token_id()
    docs = [tokenizer.encode(p, prepend=bos) for p in paragraphs]
    packer, out, i = BestFitPacker(B, T), [], 0

    def refill():
        nonlocal i
        if count is None and i >= len(docs):
            return False
        packer.add([docs[i % len(docs)]])
        i += 1
        return True
    while count is None or len(out) < count:
        rows = packer.pack_batch(refill)
        if rows is None:
            break
        t = torch.tensor(rows)
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare-nanochat", required=True, metavar="DIR", help="a checkout of karpathy/nanochat")
    parser.add_argument("--num-iterations", type=int, default=300, help="training steps")
    parser.add_argument("--text", default=None, help="corpus file (default: Python's bundled documentation)")
    parser.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary trained on the corpus")
    parser.add_argument("--seed", type=int, default=42, help="seed of both initializations")
    args = parser.parse_args()

    flags = {**PRESETS["demo"]["base_train"], "num-iterations": args.num_iterations, "seed": args.seed}
    known = {f.replace("_", "-") for f in BaseTrainConfig.__dataclass_fields__}  # (the rest is for the Ray launcher)
    cfg = BaseTrainConfig.parse(to_argv({k: v for k, v in flags.items() if k in known}))
    paragraphs = read_paragraphs(args.text)
    split = int(len(paragraphs) * 0.9)
    tokenizer = RustBPETokenizer.train_from_iterator(iter(paragraphs[:split]), args.vocab_size)
    vocab = tokenizer.get_vocab_size()
    hp = batch_hyperparameters(cfg, vocab)
    B, T, steps = cfg.device_batch_size, cfg.max_seq_len, hp["num_iterations"]
    assert hp["total_batch_size"] == B * T, "one micro-batch per step"
    schedule = [(lr_multiplier(s, steps, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac),
                 muon_momentum(s, steps, cfg.warmdown_ratio), muon_weight_decay(s, steps, hp["weight_decay"]))
                for s in range(steps)]
    with tempfile.TemporaryDirectory() as workdir:
        path = f"{workdir}/batches.pt"
        torch.save(dict(train=batches(tokenizer, paragraphs[:split], B, T, steps), schedule=schedule,
                        val=batches(tokenizer, paragraphs[split:], B, T, None)), path)
        spec = write_spec(model_config(cfg, vocab), workdir, "cpu", seed=args.seed, batches=path,
                          optimizer=optimizer_args(cfg, hp))
        results = {}
        for name, checkout in (("ours", REPO), ("nanochat", args.compare_nanochat)):
            worker = CheckoutWorker(PAIRED_WORKER, checkout, spec)
            try:
                results[name] = worker.run()
            finally:
                worker.close()
    ours, theirs = results["ours"], results["nanochat"]
    first = [abs(a - b) / b for a, b in zip(ours["losses"][:10], theirs["losses"][:10])]
    result = dict(bench="paired_run", steps=steps, tokens_per_step=B * T, vocab=vocab,
                  weight_decay=hp["weight_decay"], first_losses_ours=ours["losses"][:10],
                  first_losses_nanochat=theirs["losses"][:10], first10_max_rel_diff=max(first),
                  final_train_loss=(ours["losses"][-1], theirs["losses"][-1]),
                  val_loss_ours=ours["val_loss"], val_loss_nanochat=theirs["val_loss"],
                  val_rel_diff=abs(ours["val_loss"] - theirs["val_loss"]) / theirs["val_loss"],
                  val_loss_is_finite=math.isfinite(ours["val_loss"]))
    print(f"first 10 losses: max relative difference {max(first):.2e}; held-out loss ours {ours['val_loss']:.5f}, "
          f"nanochat's {theirs['val_loss']:.5f} ({result['val_rel_diff'] * 100:.3f}% apart) after {steps} steps")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
