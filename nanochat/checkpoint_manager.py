"""
Save and load checkpoints in nanochat's on-disk layout, written atomically and verified on load.

Layout of one checkpoint directory (e.g. <base>/base_checkpoints/d20/), per step:
    model_{step:06d}.pt            model state_dict (rank 0)
    optim_{step:06d}_rank{r}.pt    optimizer state of rank r (every rank that has one: ZeRO shards)
    meta_{step:06d}.json           metadata, indent 2, written LAST by rank 0
A step counts only once its meta file exists, so a crash mid-save leaves the previous checkpoint untouched.

Integrity: save_checkpoint adds two keys to the meta: `world_size` (of the saving run) and `files`
({name: {"size", "sha256"}} of every model/optimizer file of the step). Loading checks size and hash, so a truncated
or corrupted file raises CheckpointError naming it. load_model(step=None) then falls back to the newest earlier step
that is intact, with a warning. Meta files written by nanochat itself have no `files`: nothing to verify there.

Atomic writes (nanochat.storage): on a local disk every file goes to a temp file that is fsynced and renamed into
place; on an object store (s3://, gs://, memory://, ...) each file is one PUT, which object stores apply atomically.

Distributed: when a process group with >1 ranks is initialized, save_checkpoint is collective (every rank calls it,
with optimizer_data=None if it has nothing to save): the ranks exchange their files' checksums, which also ensures
every optimizer shard is written before rank 0 writes the meta, and a final barrier returns only once the step counts.

Resume on a different world size: load_checkpoint(load_optimizer=True, rank=r, world_size=W) on a checkpoint saved
by W_old != W ranks loads all W_old optimizer shards, merges them with nanochat.optim.consolidate_state_dicts and
returns rank r's slice from nanochat.optim.shard_state_dict. This needs MuonAdamW's sharded state dicts; other
optimizer states only load at their original world size.

Checkpoints written by nanochat load too (load_checkpoint_model): `_orig_mod.` prefixes (torch.compile) are
stripped, bf16 tensors are upcast on cpu/mps, a config without window_pattern means "L", and the newer architecture
pieces (smear, backout, value embeddings, resid/x0 lambdas) are switched off when the state dict has no weights for
them.

Models from elsewhere (load_model with a source other than base|mid|sft|rl; nanochat.hub finds the directory, on
disk or downloaded from the Hugging Face Hub): a directory in the layout above (plus tokenizer.pkl at its root or in
tokenizer/, as nanochat publishes models), or a Hugging Face export, read by nanochat.hf_format (which also writes
it) and built here with its own tokenizer.
"""
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import asdict

import torch
import torch.distributed as dist

from nanochat import hf_format, hub, storage
from nanochat.common import get_base_dir, is_distributed
from nanochat.gpt import GPTConfig, build_model
from nanochat.storage import CheckpointError

logger = logging.getLogger("nanochat")

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}


def model_name(step):
    return f"model_{step:06d}.pt"


def optim_name(step, rank):
    return f"optim_{step:06d}_rank{rank:d}.pt"


def meta_name(step):
    return f"meta_{step:06d}.json"


class _HashingWriter:
    """File-like wrapper that counts and hashes everything written through it."""

    def __init__(self, f):
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, b):
        self.sha.update(b)
        self.size += memoryview(b).nbytes
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _verify(f, expected, shown):
    """Check an open file against the size and sha256 recorded in the meta; leaves it rewound."""
    size = f.seek(0, os.SEEK_END)
    if size != expected["size"]:  # the cheap check first: truncation is the common failure
        raise CheckpointError(f"checkpoint file {shown} is truncated or padded: {size} bytes, "
                              f"expected {expected['size']}", shown)
    f.seek(0)
    sha = hashlib.sha256()
    while chunk := f.read(1 << 24):
        sha.update(chunk)
    if sha.hexdigest() != expected["sha256"]:
        raise CheckpointError(f"checkpoint file {shown} is corrupt: sha256 mismatch", shown)
    f.seek(0)


class _Dir:
    """A checkpoint directory on any storage root (nanochat.storage)."""

    def __init__(self, path):
        self.uri = str(path)

    def path(self, name):
        return storage.join(self.uri, name)

    def listdir(self):
        return storage.listdir(self.uri)

    def write(self, name, write_fn):
        """Atomically create `name` from write_fn(file); returns {"size", "sha256"} of what was written."""
        def hashed(f):
            w = _HashingWriter(f)
            write_fn(w)
            return {"size": w.size, "sha256": w.sha.hexdigest()}
        return storage.write_atomic(self.path(name), hashed)

    def remove(self, name):
        storage.remove(self.path(name))

    def read(self, name, expected=None):
        """An open binary file for `name`, checked against expected {"size", "sha256"} when given."""
        shown = self.path(name)
        try:
            f = io.BytesIO(storage.read_bytes(shown)) if storage.is_uri(shown) else storage.open_read(shown)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {shown} is missing", shown) from None
        if expected is not None:
            try:
                _verify(f, expected, shown)
            except BaseException:
                f.close()
                raise
        return f

    def subdirs(self):
        """[(name, mtime)] of the subdirectories."""
        return [(name, mtime) for name, is_dir, mtime in storage.entries(self.uri) if is_dir]


def _torch_load(d, name, meta, map_location):
    files = meta.get("files")
    expected = None
    if files is not None:  # a checkpoint we wrote: every file it relies on must be recorded
        if name not in files:
            shown = d.path(name)
            raise CheckpointError(f"checkpoint file {shown} is not recorded in its meta file", shown)
        expected = files[name]
    with d.read(name, expected) as f:
        try:
            return torch.load(f, map_location=map_location, weights_only=True)
        except Exception as e:  # unverified (nanochat-written) files can still be broken
            shown = d.path(name)
            raise CheckpointError(f"checkpoint file {shown} could not be loaded: {e}", shown) from e


def _read_meta(d, step):
    path = d.path(meta_name(step))
    with d.read(meta_name(step)) as f:
        data = f.read()
    try:
        return json.loads(data)
    except ValueError as e:
        raise CheckpointError(f"checkpoint meta {path} is not valid JSON: {e}", path) from e


def read_meta(checkpoint_dir, step):
    """The meta dict of one step (CheckpointError if missing or invalid)."""
    return _read_meta(_Dir(checkpoint_dir), step)


def find_resume_step(ckpt_dir, run_id=None):
    """Latest complete step in ckpt_dir (of run `run_id` if given: a restarted worker group resumes its own run,
    never a stale checkpoint of an older run in the same directory)."""
    try:
        steps = list_steps(ckpt_dir)
    except FileNotFoundError:
        return None
    for step in reversed(steps):
        if run_id is None or read_meta(ckpt_dir, step).get("run_id") == run_id:
            return step
    return None


# -----------------------------------------------------------------------------
# Save / load


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Rank 0 writes the model, every rank its optimizer state (if any), then rank 0 the meta (the commit point).
    Collective when a process group with >1 ranks is initialized (see the module docstring)."""
    d = _Dir(checkpoint_dir)
    files = {}
    if rank == 0:  # re-saving a step: it stops counting until its new meta is written
        d.remove(meta_name(step))
    if rank == 0 and model_data is not None:
        files[model_name(step)] = d.write(model_name(step), lambda f: torch.save(model_data, f))
    if optimizer_data is not None:
        files[optim_name(step, rank)] = d.write(optim_name(step, rank), lambda f: torch.save(optimizer_data, f))
    world_size = 1
    if is_distributed():
        world_size = dist.get_world_size()
        gathered = [None] * world_size
        dist.all_gather_object(gathered, files)  # returns on rank 0 only once every rank's files are written
        files = {name: info for g in gathered for name, info in g.items()}
    if rank == 0:
        meta = {**(meta_data or {}), "world_size": world_size, "files": dict(sorted(files.items()))}
        d.write(meta_name(step), lambda f: f.write(json.dumps(meta, indent=2).encode()))
        logger.info(f"saved checkpoint step {step} to {checkpoint_dir}")
    if is_distributed():
        dist.barrier()  # nobody moves on (e.g. to delete old steps or resume) before the step counts


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0, world_size=1):
    """-> (model_data, optimizer_data or None, meta_data). Raises CheckpointError naming a bad file."""
    d = _Dir(checkpoint_dir)
    meta = _read_meta(d, step)
    model_data = _torch_load(d, model_name(step), meta, device)
    optimizer_data = _load_optimizer(d, step, device, meta, rank, world_size) if load_optimizer else None
    return model_data, optimizer_data, meta


def _load_optimizer(d, step, device, meta, rank, world_size):
    saved_world = meta.get("world_size")
    if saved_world is None:  # nanochat-written: infer from the shard files present
        pattern = re.compile(rf"optim_{step:06d}_rank(\d+)\.pt")
        saved_world = max(1, sum(bool(pattern.fullmatch(n)) for n in d.listdir()))
    files = meta.get("files")
    if files is not None and not any(n.startswith(f"optim_{step:06d}_") for n in files):
        raise CheckpointError(f"checkpoint {d.uri} step {step} has no optimizer state")
    if saved_world == world_size:
        return _torch_load(d, optim_name(step, rank), meta, device)
    # different world size: merge all old shards (on cpu, the full state may not fit one accelerator), re-cut
    from nanochat.optim import consolidate_state_dicts, shard_state_dict
    shards = [_torch_load(d, optim_name(step, r), meta, "cpu") for r in range(saved_world)]
    if not all(isinstance(sd, dict) and sd.get("format") == "sharded" for sd in shards):
        raise CheckpointError(f"optimizer state in {d.uri} step {step} was saved by {saved_world} ranks and is not a "
                              f"MuonAdamW sharded state dict, so it cannot be re-sharded for {world_size} ranks")
    full = consolidate_state_dicts(shards, saved_world)
    return shard_state_dict(full, rank, world_size)


# -----------------------------------------------------------------------------
# Finding checkpoints

def list_steps(checkpoint_dir):
    """Sorted steps that count (their meta file exists)."""
    steps = (re.fullmatch(r"meta_(\d+)\.json", n) for n in _Dir(checkpoint_dir).listdir())
    return sorted(int(m.group(1)) for m in steps if m)


def find_last_step(checkpoint_dir):
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (meta_*.json) in {checkpoint_dir}")
    return steps[-1]


def find_largest_model(checkpoints_dir):
    """Model tag with the largest depth among subdirs named d<N>, else the most recently modified subdir."""
    subdirs = _Dir(checkpoints_dir).subdirs()
    if not subdirs:
        raise FileNotFoundError(f"no checkpoints found in {checkpoints_dir}")
    depths = [(int(m.group(1)), name) for name, _ in subdirs if (m := re.fullmatch(r"d(\d+)", name))]
    if depths:
        return max(depths)[1]
    return max(subdirs, key=lambda s: s[1])[0]


# -----------------------------------------------------------------------------
# Building a model from a checkpoint

def _patch_for_nanochat(model_config, state_dict):
    """Fill in what nanochat-written checkpoints leave implicit (keys our own saves always contain)."""
    cfg = dict(model_config)
    cfg.setdefault("window_pattern", "L")  # OLD midtraining / ORIG configs had no windows: full attention
    keys = set(state_dict)
    if "use_smear" not in cfg:
        cfg["use_smear"] = "smear_gate.weight" in keys or "smear_lambda" in keys
    if "use_backout" not in cfg:
        cfg["use_backout"] = "backout_lambda" in keys
    if "use_value_embeds" not in cfg:
        cfg["use_value_embeds"] = any(k.startswith("value_embeds.") for k in keys)
    if "use_resid_lambdas" not in cfg:
        cfg["use_resid_lambdas"] = "resid_lambdas" in keys or "x0_lambdas" in keys
    if not {"rope_base", "qk_scale", "ve_gate_channels"} & set(cfg):  # constants nanochat's meta never names
        cfg.update(_era_constants(cfg, state_dict))
    if cfg["use_resid_lambdas"]:  # only one of the pair saved: the other at its no-op value (nanochat's patch)
        n_layer = cfg["n_layer"]
        ref = state_dict.get("resid_lambdas", state_dict.get("x0_lambdas"))
        if ref is not None:
            state_dict.setdefault("resid_lambdas", torch.ones(n_layer, dtype=ref.dtype, device=ref.device))
            state_dict.setdefault("x0_lambdas", torch.zeros(n_layer, dtype=ref.dtype, device=ref.device))
    return cfg


def _era_constants(cfg, state_dict):
    """The constants of the nanochat version that wrote these weights. Its VE gates tell: an OLD-era model (before
    the March 2026 changes) gated value embeddings with 2*sigmoid over 32 channels and also used RoPE base 10k, no
    QK scale and T/2 short windows; a model without VE or smear is older still (ORIG) and shares the RoPE and QK
    constants. Anything else is the current model, our defaults."""
    gate = next((v for k, v in state_dict.items() if k.endswith("attn.ve_gate.weight")), None)
    old = dict(rope_base=10000.0, qk_scale=1.0)
    if gate is not None and gate.shape[1] == 32:
        return dict(old, ve_gate_channels=32, ve_gate_scale=2.0, short_window=cfg["sequence_len"] // 2)
    if gate is None and not cfg["use_smear"]:
        return old
    return {}


def _tokenizer_file(tokenizer_dir):
    """nanochat's tokenizer.pkl in tokenizer_dir, else a Hugging Face tokenizer.json, else None."""
    from nanochat.tokenizer import TOKENIZER_PKL
    return next((path for path in (storage.join(tokenizer_dir, name) for name in (TOKENIZER_PKL, "tokenizer.json"))
                 if storage.exists(path)), None)


def _find_tokenizer(tokenizer_dir):
    """The tokenizer in tokenizer_dir (see _tokenizer_file), or None."""
    from nanochat.hf_tokenizer import from_hf_tokenizer_json
    from nanochat.tokenizer import RustBPETokenizer
    path = _tokenizer_file(tokenizer_dir)
    if path is None:
        return None
    return from_hf_tokenizer_json(path) if path.endswith(".json") else RustBPETokenizer.from_directory(tokenizer_dir)


def _check_vocab(tokenizer, config, where):
    if tokenizer is not None and tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(f"tokenizer vocab size {tokenizer.get_vocab_size()} does not match the checkpoint's "
                         f"vocab_size {config.vocab_size} ({where}): wrong base dir or tokenizer?")


def _on_device(model_data, device):
    """bf16 checkpoints from GPU runs compute in fp32 on cpu/mps; torch.compile's `_orig_mod.` prefixes dropped."""
    if device.type in ("cpu", "mps"):
        model_data = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in model_data.items()}
    return {k.removeprefix("_orig_mod."): v for k, v in model_data.items()}


def _assemble(config, model_data, device, phase):
    """A GPT of `config` holding exactly model_data's weights, in train or eval mode."""
    assert phase in ("train", "eval"), f"phase must be 'train' or 'eval', got {phase!r}"
    model = build_model(config, device)  # meta device -> to_empty -> init_weights (rotary buffers, dtypes)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    model.load_state_dict(model_data, strict=True, assign=True)
    # assign=True adopts the saved dtypes; restore the model's own policy (e.g. bf16 embeddings on CUDA)
    for n, p in model.named_parameters():
        if p.dtype != dtypes[n]:
            p.data = p.data.to(dtypes[n])
    return model.train() if phase == "train" else model.eval()


def load_checkpoint_model(checkpoint_dir, step, device, phase, base_dir=None, tokenizer_dir=None):
    """-> (model, tokenizer or None, meta). The tokenizer comes from tokenizer_dir (default <base_dir>/tokenizer)
    when there is one."""
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    model_data = _on_device(model_data, device)
    config = GPTConfig.from_dict(_patch_for_nanochat(meta["model_config"], model_data))
    model = _assemble(config, model_data, device, phase)
    if tokenizer_dir is None:
        tokenizer_dir = storage.join(base_dir if base_dir is not None else get_base_dir(), "tokenizer")
    tokenizer = _find_tokenizer(tokenizer_dir)
    _check_vocab(tokenizer, config, f"{checkpoint_dir} step {step}")
    return model, tokenizer, meta


def _build_newest(checkpoint_dir, step, device, phase, **where):
    """load_checkpoint_model of `step`, or with step=None of the newest step, falling back to earlier ones while
    broken."""
    if step is not None:
        return load_checkpoint_model(checkpoint_dir, step, device, phase, **where)
    steps = list_steps(checkpoint_dir)
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint (meta_*.json) in {checkpoint_dir}")
    for i, s in enumerate(reversed(steps)):
        try:
            return load_checkpoint_model(checkpoint_dir, s, device, phase, **where)
        except CheckpointError as e:
            if i == len(steps) - 1:
                raise
            logger.warning(f"skipping checkpoint step {s}: {e}; falling back to an earlier step")


def load_model(source, device, phase, model_tag=None, step=None, base_dir=None):
    """-> (model, tokenizer, meta). source base|mid|sft|rl: from <base_dir>/<its checkpoints>/<model_tag>/, by
    default the largest d<N> tag; any other source is a directory or Hugging Face Hub repo (nanochat.hub;
    model_tag does not apply, and the tokenizer is the model's own). step: default the newest; with step=None a
    broken newest step of nanochat's layout falls back to the previous intact one."""
    if source not in SOURCE_DIRS:
        return load_directory(hub.locate(source, step), device, phase, step, source)
    base_dir = base_dir if base_dir is not None else get_base_dir()
    checkpoints_dir = storage.join(base_dir, SOURCE_DIRS[source])
    model_tag = model_tag if model_tag is not None else find_largest_model(checkpoints_dir)
    return _build_newest(storage.join(checkpoints_dir, model_tag), step, device, phase, base_dir=base_dir)


# -----------------------------------------------------------------------------
# Models from elsewhere: a local directory, a Hugging Face export or in nanochat's layout

def load_directory(directory, device, phase, step=None, source=None):
    """-> (model, tokenizer, meta) from a local directory: a Hugging Face export (config.json) or nanochat's layout
    (meta_*.json, tokenizer.pkl at the root or in tokenizer/). source: what to record as the meta's "source"."""
    if hf_format.is_export(directory):
        return _build_hf_export(directory, device, phase, step, source or directory)
    if not list_steps(directory):
        raise FileNotFoundError(f"{directory} is neither a Hugging Face export (config.json) nor a nanochat "
                                f"checkpoint directory (meta_*.json)")
    tokenizer_dir = next((d for d in (directory, os.path.join(directory, "tokenizer")) if _tokenizer_file(d)), None)
    if tokenizer_dir is None:
        raise FileNotFoundError(f"no tokenizer.pkl or tokenizer.json in {directory} or its tokenizer/ directory")
    return _build_newest(directory, step, device, phase, tokenizer_dir=tokenizer_dir)


def source_tag(source, base_dir=None):
    """The tag of what a stage trains from `source`: a stage's largest d<N> (as load_model picks it), else the
    directory's or Hub repo's name."""
    if source in SOURCE_DIRS:
        return find_largest_model(storage.join(base_dir or get_base_dir(), SOURCE_DIRS[source]))
    return hub.source_name(source)


def pin_source(source):
    """`source` such that every worker loads the same model: a stage's name as it is, a directory made absolute, a
    Hub repo pinned to its current commit (nanochat.hub.pin)."""
    return source if source in SOURCE_DIRS else hub.pin(source)


def directory_step(directory, step=None):
    """The step load_directory(directory, step=step) loads: an export's recorded step, else `step` or the newest."""
    if hf_format.is_export(directory):
        return hf_format.export_step(directory)
    return step if step is not None else find_last_step(directory)


def _build_hf_export(directory, device, phase, step, source):
    """A Hugging Face export (nanochat.hf_format) -> (model, tokenizer, meta)."""
    device = torch.device(device)
    config, model_data, provenance = hf_format.read_export(directory, device, step)
    model = _assemble(config, _on_device(model_data, device), device, phase)
    tokenizer = _find_tokenizer(directory)
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.pkl in {directory}")
    _check_vocab(tokenizer, config, directory)
    meta = {"model_config": asdict(config), "step": provenance["step"], "model_tag": provenance["model_tag"],
            "source": source, "directory": directory}
    return model, tokenizer, meta
