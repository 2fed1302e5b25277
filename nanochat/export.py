"""
Export a model to a Hugging Face transformers directory (the format: nanochat.hf_format).

    python -m nanochat.export hf --source sft --out exports/d20 [--model-tag d20] [--step 650] [--dtype bfloat16]

--source is anything nanochat loads (nanochat.checkpoint_manager.load_model); the export loads back as a --source
too. A non-empty --out is refused unless --force, before the model is loaded.
"""
import os
import sys
from dataclasses import dataclass

import torch

from nanochat.checkpoint_manager import SOURCE_DIRS, CheckpointError, load_model, source_tag
from nanochat.flags import ArgsMixin, flag
from nanochat.hf_format import check_out, export_hf
from nanochat.hub import HubError

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
