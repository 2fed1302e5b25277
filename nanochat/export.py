"""
Export a model to a Hugging Face transformers directory.

    python -m nanochat.export hf --source sft --out exports/d20 [--model-tag d20] [--step 650] [--dtype bfloat16]

The directory holds config.json (GPTConfig's fields, model_type "nanochat", auto_map to the modeling code),
generation_config.json, model.safetensors (or model-0000i-of-0000N.safetensors shards and
model.safetensors.index.json, past --max-shard-size), modeling_nanochat.py (a copy of nanochat/hf_modeling.py) and the
fast tokenizer with its chat template (nanochat/hf_tokenizer.py). transformers loads it with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True); AutoTokenizer.from_pretrained(DIR)

and nanochat loads it back as a --source (nanochat.checkpoint_manager). The safetensors keys are our state-dict keys.

The export is written into a temp directory next to --out and renamed into place at the end, so a crash never leaves
half an export; a non-empty --out is refused unless --force.
"""
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from nanochat.checkpoint_manager import SOURCE_DIRS, CheckpointError, load_model, source_tag
from nanochat.flags import ArgsMixin, flag
from nanochat.hf_tokenizer import save_hf_tokenizer
from nanochat.hub import HubError

MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text):
    """'5GB' -> 5 * 10**9 bytes (KB/MB/GB are powers of 10, KiB/MiB/GiB of 2, as in transformers); a bare number is
    bytes."""
    s = str(text).strip().upper().replace(" ", "")
    unit = next((u for u in sorted(UNITS, key=len, reverse=True) if s.endswith(u)), "B")
    number = s[:len(s) - len(unit)] if s.endswith(unit) else s
    try:
        size = int(float(number) * UNITS[unit])
    except ValueError:
        raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)") from None
    if size <= 0:
        raise ValueError(f"the shard size must be positive, got {text!r}")
    return size


def check_out(out_dir, force=False):
    """Refuse to replace a non-empty directory (or any file) at out_dir unless force."""
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and (force or not os.listdir(out_dir))):
        what = "a file" if not os.path.isdir(out_dir) else "not empty"
        raise FileExistsError(f"{out_dir} is {what}; pass --force to replace it")


def shard(state, max_bytes):
    """Split {name: tensor} in order into [{name: tensor}] of at most max_bytes each (a larger tensor alone)."""
    shards, size = [{}], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def hf_config(model, tokenizer, meta, dtype):
    """config.json: GPTConfig's fields, the padded vocabulary, token ids, auto_map and the provenance."""
    from nanochat.hf_modeling import NanochatConfig
    meta = meta or {}
    eos = tokenizer.encode_special("<|assistant_end|>")
    dtype_name = str(dtype).removeprefix("torch.")
    config = NanochatConfig(
        **asdict(model.config), padded_vocab_size=model.padded_vocab_size,
        bos_token_id=tokenizer.get_bos_token_id(), eos_token_id=eos, pad_token_id=eos,
        architectures=["NanochatForCausalLM"], dtype=dtype_name,
        auto_map={"AutoConfig": "modeling_nanochat.NanochatConfig",
                  "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"},
        nanochat={k: meta.get(k) for k in ("source", "model_tag", "step")})
    # torch_dtype too: transformers 5 writes `dtype`, older transformers and other tooling read `torch_dtype`
    return {**config.to_dict(), "torch_dtype": dtype_name}


def generation_config(tokenizer):
    """Stop where nanochat's Engine stops: <|assistant_end|> first (the eos), then BOS and the other turns'
    tokens; pad with the eos. Greedy by default, as transformers is."""
    eos = tokenizer.encode_special("<|assistant_end|>")
    stops = [eos] + sorted(tokenizer.turn_end_ids() - {eos})
    return {"bos_token_id": tokenizer.get_bos_token_id(), "eos_token_id": stops, "pad_token_id": eos}


def export_hf(model, tokenizer, out_dir, meta=None, dtype=torch.float32, max_shard_bytes=5 * 10**9, force=False):
    """Write the Hugging Face directory of `model` (a nanochat GPT) and `tokenizer` at out_dir (see the module
    docstring); meta: its checkpoint's meta, for the provenance (source, model_tag, step); force: replace a non-empty
    out_dir. Returns a summary: out, files, shards, bytes, seconds."""
    from safetensors.torch import save_file
    t0 = time.time()
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise ValueError(f"tokenizer vocab size {tokenizer.get_vocab_size()} does not match the model's "
                         f"{model.config.vocab_size}")
    out_dir = os.path.abspath(out_dir)
    check_out(out_dir, force)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in model.state_dict().items()}
        shards = shard(state, max_shard_bytes)
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, part in zip(names, shards):
            save_file(part, os.path.join(tmp, name), metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": {k: name for name, part in zip(names, shards) for k in part}}
            _write_json(os.path.join(tmp, "model.safetensors.index.json"), index)
        _write_json(os.path.join(tmp, "config.json"), hf_config(model, tokenizer, meta, dtype))
        _write_json(os.path.join(tmp, "generation_config.json"), generation_config(tokenizer))
        shutil.copyfile(MODELING_FILE, os.path.join(tmp, "modeling_nanochat.py"))
        save_hf_tokenizer(tokenizer, tmp)
        _default_permissions(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(os.listdir(out_dir))
    return {"out": out_dir, "files": files, "shards": len(shards),
            "bytes": sum(os.path.getsize(os.path.join(out_dir, f)) for f in files),
            "seconds": time.time() - t0}


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _default_permissions(directory):
    """The modes a plain mkdir / open would have given (mkdtemp makes 0700, safetensors writes 0600), so the export
    is as readable as any other directory of the user's."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def _replace_dir(tmp, out_dir):
    """Rename tmp to out_dir; an existing out_dir (empty, or replaced with --force) goes aside first, and only once
    the new one is in place is the old one deleted."""
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".old", dir=os.path.dirname(out_dir))
        os.replace(out_dir, old)  # onto the empty directory mkdtemp made
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old)


# -----------------------------------------------------------------------------
# Command line

@dataclass
class ExportConfig(ArgsMixin):
    format: str = flag(None, "the export format: hf (a Hugging Face transformers directory)", positional=True,
                       required=True, choices=["hf"])
    source: str = flag(None, f"model to export: {'|'.join(SOURCE_DIRS)} under the storage root, or a directory / "
                             f"Hub repo that nanochat loads (owner/name[@revision])", required=True)
    out: str = flag(None, "output directory (created; must not exist or be empty, unless --force)", required=True)
    model_tag: str | None = flag(None, "model tag (default: the largest d<N>)", aliases=["-g"])
    step: int | None = flag(None, "checkpoint step (default: the last)", aliases=["-s"])
    base_dir: str | None = flag(None, "storage root (local path, NFS mount, or s3:// / gs:// URI); default "
                                      "$NANOCHAT_BASE_DIR or ~/.cache/nanochat", aliases=["--storage"])
    dtype: str = flag("float32", "dtype of the exported weights", choices=list(DTYPES))
    max_shard_size: str = flag("5GB", "largest safetensors file before the weights are split into shards "
                                      "(e.g. 5GB, 500MB, 2GiB)")
    force: bool = flag(False, "replace a non-empty --out")


def main(argv=None):
    args = ExportConfig.parse(argv, __doc__)
    try:
        max_shard_bytes = parse_size(args.max_shard_size)
        check_out(os.path.abspath(args.out), args.force)  # before the (slow) load
        model, tokenizer, meta = load_model(args.source, "cpu", "eval", model_tag=args.model_tag, step=args.step,
                                            base_dir=args.base_dir)
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer found for --source {args.source} (expected <base-dir>/tokenizer)")
        tag = args.model_tag or meta.get("model_tag") or source_tag(args.source, args.base_dir)
        meta = {**meta, "source": args.source, "model_tag": tag}
        summary = export_hf(model, tokenizer, args.out, meta, DTYPES[args.dtype], max_shard_bytes, args.force)
    except ImportError as e:  # safetensors, tokenizers, transformers: the [hf] extra
        sys.exit(f'nanochat.export: error: {e} (pip install -e ".[hf]")')
    except (FileNotFoundError, FileExistsError, ValueError, CheckpointError, HubError) as e:
        sys.exit(f"nanochat.export: error: {e}")
    print(f"exported {args.source} {tag} step {meta.get('step')} to {summary['out']}: {len(summary['files'])} files "
          f"({summary['shards']} safetensors), {summary['bytes'] / 1e6:.1f} MB, {summary['seconds']:.1f} s")
    return summary


if __name__ == "__main__":
    main()
