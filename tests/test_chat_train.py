"""Midtraining and SFT: batch construction (packing, masks, padding, striding, resume) and end-to-end stages."""
import json
import math
import os
from dataclasses import asdict

import pytest
import torch

from conftest import SHARED_DATA
from fake_hub import write_hf_export
from nanochat.chat_train import STAGE_CONFIGS, MidTrainConfig, SFTConfig, chat_train_worker, main, output_dir, \
    packed_conversations, padded_conversations
from nanochat.checkpoint_manager import list_steps, read_meta, save_checkpoint
from nanochat.dataset import PACKAGE_TASK_DATA
from nanochat.flags import AUTO
from nanochat.gpt import GPTConfig, build_model
from nanochat.train import WorkerContext

CONVS = [{"messages": [{"role": "user", "content": f"question number {i}?"},
                       {"role": "assistant", "content": f"answer {i} " * (1 + i % 5)}]} for i in range(40)]


def test_packed_conversations_cover_each_once_with_all_tokens_as_targets(tiny_tokenizer):
    seen = []
    for rank in range(2):
        for x, y, state in packed_conversations(CONVS, tiny_tokenizer, 2, 24, rank, 2, "cpu", buffer_size=4):
            assert x.shape == y.shape == (2, 24)
            assert (x[:, 0] == tiny_tokenizer.get_bos_token_id()).all()  # rows start at a conversation
            assert (y >= 0).all()  # midtraining: every token is a target
            assert torch.equal(x[:, 1:], y[:, :-1])
        seen.append(state["next"])
    assert seen[0] >= 40 and seen[1] >= 40  # each rank walked to the end of its stride


def test_padded_conversations_mask_and_padding(tiny_tokenizer):
    tok = tiny_tokenizer
    x, y, state = next(padded_conversations(CONVS, tok, 3, 64, 0, 1, "cpu"))
    pad = tok.encode_special("<|assistant_end|>")
    for row in range(3):
        ids, mask = tok.render_conversation(CONVS[row], max_tokens=65)
        n = len(ids) - 1
        assert x[row, :n].tolist() == ids[:-1] and (x[row, n:] == pad).all()
        expect = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert y[row, :n].tolist() == expect and (y[row, n:] == -1).all()
        assert any(t >= 0 for t in expect) and expect[0] == -1  # only the assistant's tokens are supervised
    assert state == {"rank": 0, "world_size": 1, "next": 3}


def test_a_conversation_cut_before_its_reply_is_skipped(tiny_tokenizer):
    """Regression: rows with no trained token made micro-batches with no loss (NaN) once a long prompt filled T."""
    long_prompt = {"messages": [{"role": "user", "content": "words " * 100}, {"role": "assistant", "content": "ok"}]}
    x, y, state = next(padded_conversations([long_prompt, CONVS[0], CONVS[1]], tiny_tokenizer, 2, 32, 0, 1, "cpu"))
    assert (y >= 0).any(dim=1).all() and state["next"] == 3  # conversations 1 and 2; 0 was skipped
    with pytest.raises(ValueError, match="no conversation has a trained token within max_seq_len 32"):
        next(padded_conversations([long_prompt], tiny_tokenizer, 2, 32, 0, 1, "cpu"))


def test_sft_striding_and_resume_on_another_world_size(tiny_tokenizer):
    def rows(rank, world, resume=None, n=2):
        gen = padded_conversations(CONVS, tiny_tokenizer, 2, 64, rank, world, "cpu", resume)
        return [next(gen) for _ in range(n)]
    r0, r1 = rows(0, 2), rows(1, 2)
    assert r0[-1][2]["next"] == 8 and r1[-1][2]["next"] == 9
    resumed = rows(0, 1, [r0[-1][2], r1[-1][2]], n=1)
    first, _ = tiny_tokenizer.render_conversation(CONVS[8], max_tokens=65)
    assert resumed[0][0][0, :len(first) - 1].tolist() == first[:-1]  # continues at conversation 8


def test_sft_num_epochs_stops(tiny_tokenizer):
    batches = list(padded_conversations(CONVS[:6], tiny_tokenizer, 2, 64, 0, 1, "cpu", num_epochs=2))
    assert len(batches) == 6


def test_each_stage_has_its_own_flags_and_defaults(capsys):
    """nanochat's values, which the stages used to reach through -1 placeholders; a flag of the other stage is an
    error; `python -m nanochat.chat_train --stage S --help` lists S's flags with its defaults."""
    mid, sft = MidTrainConfig.parse([]), SFTConfig.parse([])
    assert (mid.source, mid.device_batch_size, mid.init_lr_frac, mid.eval_every) == ("base", AUTO, 1.0, 150)
    assert (sft.source, sft.device_batch_size, sft.init_lr_frac, sft.eval_every) == ("mid", 4, 0.02, 100)
    assert MidTrainConfig.parse(["--device-batch-size", "auto"]) == mid
    with pytest.raises(SystemExit):
        MidTrainConfig.parse(["--target-examples-per-step", "8"])
    capsys.readouterr()
    for stage, own, other in [("mid", "total-batch-size", "eval-steps"), ("sft", "eval-steps", "eval-tokens")]:
        with pytest.raises(SystemExit):
            main(["--stage", stage, "--help"])
        options = " ".join(capsys.readouterr().out.split("options:")[1].split()).split(" --")
        helps = {entry.split()[0]: entry for entry in options[1:]}
        assert own in helps and other not in helps
        cfg = STAGE_CONFIGS[stage]()
        assert helps["init-lr-frac"].endswith(f"(default: {cfg.init_lr_frac})")
        assert helps["eval-every"].endswith(f"(default: {cfg.eval_every})")


@pytest.fixture(scope="module")
def stage_storage(tmp_path_factory, tiny_tokenizer):
    return make_stage_storage(tmp_path_factory.mktemp("chat_storage"), tiny_tokenizer)


def make_stage_storage(root, tiny_tokenizer):
    """A storage root with the tiny tokenizer, a tiny base checkpoint and small offline task files."""
    tiny_tokenizer.save(str(root / "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64)
    torch.manual_seed(0)
    model = build_model(config)
    save_checkpoint(str(root / "base_checkpoints" / "d2"), 5, model.state_dict(), None,
                    {"model_config": asdict(config), "step": 5})
    data = root / "task_data"
    # the real offline copy when present, else the small task pack that ships with the package (same layout)
    from nanochat.dataset import PACKAGE_TASK_DATA
    os.symlink(SHARED_DATA if SHARED_DATA.exists() else PACKAGE_TASK_DATA, data)
    return str(root)


def run_stage(stage, storage, monkeypatch, tokenizer, **overrides):
    elsewhere = storage + "_elsewhere"  # the root comes in the worker's context, not from the environment
    monkeypatch.setenv("NANOCHAT_BASE_DIR", elsewhere)
    settings = dict(max_seq_len=64, device_batch_size=2, num_iterations=6, eval_every=3, save_every=3,
                    task_data=os.path.join(storage, "task_data"), mixture_scale=0.0005)
    settings.update(dict(total_batch_size=256, eval_tokens=256) if stage == "mid" else
                    dict(target_examples_per_step=4, eval_steps=2, eval_metrics_every=6, eval_metrics_max_problems=16))
    cfg = STAGE_CONFIGS[stage](**{**settings, **overrides}).resolved()
    ckpt = output_dir(cfg, storage)
    os.makedirs(ckpt, exist_ok=True)
    ctx = WorkerContext(checkpoint_dir=ckpt, base_dir=storage, metrics_path=ckpt + "/metrics.jsonl")
    summary = chat_train_worker(cfg, ctx, run_id="test", tokenizer=tokenizer)
    assert not os.path.exists(elsewhere)
    return summary, ckpt


def test_mid_then_sft_plain_process(stage_storage, tiny_tokenizer, monkeypatch):
    # mid's default device batch is auto: on CPU the largest divisor up to 32 of the rows per step (256 / 64)
    assert MidTrainConfig().device_batch_size == AUTO
    summary, mid_dir = run_stage("mid", stage_storage, monkeypatch, tiny_tokenizer, device_batch_size=AUTO)
    assert summary["step"] == 6 and list_steps(mid_dir) == [3, 6] and mid_dir.endswith("mid_checkpoints/d2")
    meta = read_meta(mid_dir, 6)
    assert meta["stage"] == "mid" and meta["source"] == "base" and meta["source_step"] == 5
    assert meta["device_batch_size"] == 4
    assert 0 < summary["val_bpb"] < 20
    summary, sft_dir = run_stage("sft", stage_storage, monkeypatch, tiny_tokenizer)
    assert summary["step"] == 6 and sft_dir.endswith("chatsft_checkpoints/d2")
    assert read_meta(sft_dir, 6)["source"] == "mid" and 0 < summary["val_loss"] < 20
    assert 0 <= summary["mmlu_acc"] <= 1 and 0 <= summary["arc_easy_acc"] <= 1
    losses = [json.loads(line) for line in open(os.path.join(sft_dir, "metrics.jsonl"))]
    assert [r["step"] for r in losses if "raw_loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["raw_loss"]) for r in losses if "raw_loss" in r)


def test_mid_from_a_hugging_face_export_directory(tmp_path, tiny_tokenizer, monkeypatch):
    """--source a local export: a storage root without any checkpoint or tokenizer of its own (the model brings its
    tokenizer, also for bits per byte); the output is named after the directory."""
    config = GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2,
                       n_embd=64)
    torch.manual_seed(0)
    export = write_hf_export(build_model(config), tiny_tokenizer, str(tmp_path / "exports" / "tiny-chat"), step=9)
    root = tmp_path / "root"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(root))
    cfg = MidTrainConfig(source=export, max_seq_len=64, device_batch_size=2, total_batch_size=256,
                         num_iterations=2, eval_every=2, eval_tokens=256, save_every=2, mixture_scale=0.0005,
                         task_data=str(SHARED_DATA if SHARED_DATA.exists() else PACKAGE_TASK_DATA)).resolved()
    ckpt = output_dir(cfg, str(root))
    assert ckpt == str(root / "mid_checkpoints" / "tiny-chat")
    os.makedirs(ckpt)
    summary = chat_train_worker(cfg, WorkerContext(checkpoint_dir=ckpt, metrics_path=ckpt + "/metrics.jsonl"))
    meta = read_meta(ckpt, 2)
    assert summary["step"] == 2 and 0 < summary["val_bpb"] < 20
    assert meta["source"] == export and meta["source_step"] == 9


def test_mid_and_sft_train_in_bf16_close_to_fp32(tmp_path, tiny_tokenizer, monkeypatch):
    """bf16 compute (the GPU path: bf16 embeddings and activations, fp32 master weights) from the same base model:
    finite losses that follow the fp32 run's."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        root = make_stage_storage(tmp_path / dtype, tiny_tokenizer)
        monkeypatch.setenv("NANOCHAT_DTYPE", dtype)
        for stage in ("mid", "sft"):
            no_accuracy = {"eval_metrics_every": -1} if stage == "sft" else {}
            _, ckpt = run_stage(stage, root, monkeypatch, tiny_tokenizer, num_iterations=2, **no_accuracy)
            rows = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
            losses[stage, dtype] = [r["raw_loss"] for r in rows if "raw_loss" in r]
    for stage in ("mid", "sft"):
        fp32, bf16 = losses[stage, "float32"], losses[stage, "bfloat16"]
        assert len(fp32) == len(bf16) == 2 and all(math.isfinite(x) for x in bf16)
        assert all(abs(a - b) / a < 0.02 for a, b in zip(fp32, bf16)), (stage, fp32, bf16)
