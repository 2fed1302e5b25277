"""
The Hugging Face export format: writing a model's directory (export_hf) and reading one back (read_export).

An export holds
    config.json                 GPTConfig's fields, the padded vocabulary, token ids, model_type "nanochat_ray",
                                auto_map to the modeling code, the provenance (source, model_tag, step) under "nanochat"
    generation_config.json      stops where nanochat's Engine stops
    model.safetensors           our state-dict keys; past max_shard_bytes model-0000i-of-0000N.safetensors shards
                                and model.safetensors.index.json
    modeling_nanochat.py        a copy of nanochat/hf_modeling.py
    tokenizer.json ...          the fast tokenizer with its chat template (nanochat/hf_tokenizer.py)
so that transformers loads it with

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)

The model type is ours: transformers (5.x) ships a model type "nanochat" of its own, an older architecture with
other weight names, which it would build from our config.json if we named it. A type it does not know makes it ask
for trust_remote_code=True instead (on a terminal it asks whether to run modeling_nanochat.py, else it raises).

Writing: into a temp directory next to the output, renamed into place at the end, so a crash never leaves half an
export; a non-empty output is refused unless force.

Reading: config.json (every GPTConfig field required; model_type "nanochat_ray", or "nanochat", the type of the
exports written before), model.safetensors or the shards its index names (every tensor in the file the index says, the
keys exactly those of GPT(config)), the step asked for checked against the recorded one. A truncated or corrupt
file raises CheckpointError naming it. Building the model and the tokenizer is nanochat.checkpoint_manager's.
"""
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, fields

import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.hf_tokenizer import save_hf_tokenizer
from nanochat.storage import CheckpointError

MODEL_TYPE = "nanochat_ray"
READ_MODEL_TYPES = (MODEL_TYPE, "nanochat")  # "nanochat": what exports were written with before MODEL_TYPE
MODELING_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling.py")


# -----------------------------------------------------------------------------
# Writing

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
# Reading

def is_export(directory):
    """Whether a local directory holds an export (its config.json)."""
    return os.path.isfile(os.path.join(directory, "config.json"))


def export_step(directory):
    """The step an export was made from (None if not recorded)."""
    return (_read_json(os.path.join(directory, "config.json")).get("nanochat") or {}).get("step")


def read_export(directory, device, step=None):
    """-> (GPTConfig, state dict on `device`, provenance {source, model_tag, step}) of the export in a local
    directory, checked as the module docstring says; step: the one the caller asks for, if any."""
    path = os.path.join(directory, "config.json")
    cfg = _read_json(path)
    if cfg.get("model_type") not in READ_MODEL_TYPES:
        raise CheckpointError(f"{path} is a {cfg.get('model_type')!r} model, not a nanochat export", path)
    # every field required: one left out would silently take today's default, maybe not what the weights learned
    names = [f.name for f in fields(GPTConfig)]
    missing = [n for n in names if n not in cfg]
    if missing:
        raise CheckpointError(f"{path} lacks the model config fields {missing}", path)
    config = GPTConfig.from_dict({n: cfg[n] for n in names})
    provenance = cfg.get("nanochat") or {}
    if step is not None and provenance.get("step") not in (None, step):
        raise ValueError(f"{directory} is an export of step {provenance['step']}, not of step {step}")
    state = _read_safetensors(directory, device)
    with torch.device("meta"):
        expected = set(GPT(config).state_dict())
    if set(state) != expected:
        raise CheckpointError(f"the weights in {directory} do not fit its config.json: missing "
                              f"{sorted(expected - set(state))[:8]}, unexpected {sorted(set(state) - expected)[:8]}",
                              directory)
    return config, state, {k: provenance.get(k) for k in ("source", "model_tag", "step")}


def _read_json(path):
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}", path) from e


def _read_safetensors(directory, device):
    """The state dict of model.safetensors, or of the shards model.safetensors.index.json names (each tensor in the
    file the index says, none missing)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError('a Hugging Face export needs safetensors: pip install -e ".[hf]"') from None
    index = os.path.join(directory, "model.safetensors.index.json")
    weight_map = _read_json(index).get("weight_map") if os.path.isfile(index) else None
    if weight_map is not None and not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no weight_map", index)
    state = {}
    for name in sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file {path} is missing", path)
        try:
            tensors = load_file(path, device=str(device))
        except Exception as e:  # safetensors' errors for a short file or a broken header
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupt: {e}", path) from e
        stray = sorted(k for k in tensors if weight_map is not None and weight_map.get(k) != name)
        if stray:
            raise CheckpointError(f"checkpoint file {path} holds tensors its index puts elsewhere: {stray[:8]}", path)
        state.update(tensors)
    absent = sorted(set(weight_map or ()) - set(state))
    if absent:
        raise CheckpointError(f"tensors listed in {index} are in none of its files: {absent[:8]}", index)
    return state
