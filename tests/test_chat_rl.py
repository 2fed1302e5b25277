"""RL on GSM8K: the reward / advantage / masking / loss math on hand-made completions, then the stage end to end
(plain process with resume, Ray with 2 workers through the launcher, recovery after a killed worker)."""
import gzip
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, replace

import pytest
import torch

from conftest import SHARED_DATA, perturbed
from nanochat.chat_rl import RLConfig, chat_rl_worker, completion_rewards, group_advantages, output_dir, \
    pass_at_k, pg_loss, rollout_batch, rollout_seed, start_cursor
from nanochat.chat_train import rendered_conversations
from nanochat.checkpoint_manager import list_steps, load_checkpoint, read_meta, save_checkpoint
from nanochat.gpt import GPTConfig, build_model
from nanochat.train import WorkerContext
from tasks.gsm8k import GSM8K

ROWS = [{"question": f"Tom has {i} apples and buys 3 more. How many apples does he have?",
         "answer": f"He has {i}+3 = <<{i}+3={i + 3}>>{i + 3} apples.\n#### {i + 3}"} for i in range(12)]
TAGS = ("plain", "launcher", "crash")


def write_gsm8k(root, train_rows, test_rows):
    os.makedirs(os.path.join(root, "gsm8k"), exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        with gzip.open(os.path.join(root, "gsm8k", f"{split}.jsonl.gz"), "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="module")
def gsm_hand(tmp_path_factory):
    d = tmp_path_factory.mktemp("gsm_hand")
    write_gsm8k(str(d), ROWS, ROWS[:4])
    return GSM8K(split="train", data_path=str(d / "gsm8k"))


# -----------------------------------------------------------------------------
# The math

def test_rewards_on_hand_made_completions(gsm_hand, tiny_tokenizer):
    tok = tiny_tokenizer
    conv = gsm_hand[0]
    gold = [p["text"] for p in conv["messages"][-1]["content"] if p["type"] == "text"][-1].split("#### ")[1]
    prompt = tok.render_for_completion(conv)
    completions = [f"so the answer is\n#### {gold}",  # correct
                   f"#### {int(gold) + 1}",  # wrong number
                   f"the answer is {gold}",  # no '#### N' at all
                   f"#### {gold[0]},{gold[1:]}" if len(gold) > 1 else f"#### {gold}",  # commas are stripped
                   ""]  # nothing sampled
    seqs = [prompt + tok.encode(c) for c in completions]
    assert completion_rewards(gsm_hand, conv, seqs, len(prompt), tok) == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_group_advantages_are_mean_centered_per_group():
    assert group_advantages([1, 0, 0, 1]).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1, 0, 0, 0]).tolist() == [0.75, -0.25, -0.25, -0.25]  # no std normalization
    assert group_advantages([1, 1, 1]).tolist() == [0, 0, 0]  # agreement: no signal
    assert group_advantages([0, 0]).tolist() == [0, 0]


def test_rollout_batch_masks_prompt_tool_output_and_padding(tiny_tokenizer):
    tok = tiny_tokenizer
    sp = tok.encode_special
    prompt = tok.render_for_completion({"messages": [{"role": "user", "content": "2+3?"},
                                                     {"role": "assistant", "content": "x"}]})
    call = [sp("<|python_start|>"), *tok.encode("2+3"), sp("<|python_end|>")]  # sampled
    output = [sp("<|output_start|>"), *tok.encode("5"), sp("<|output_end|>")]  # forced by the engine
    answer = tok.encode("#### 5")  # sampled
    long_seq = prompt + call + output + answer
    long_mask = [0] * len(prompt) + [1] * len(call) + [0] * len(output) + [1] * len(answer)
    short_seq, short_mask = prompt + answer, [0] * len(prompt) + [1] * len(answer)
    pad = sp("<|assistant_end|>")
    inputs, targets = rollout_batch([long_seq, short_seq], [long_mask, short_mask], pad)
    n = len(long_seq)
    assert inputs.shape == targets.shape == (2, n - 1)
    assert inputs[0].tolist() == long_seq[:-1]
    expect = [t if m else -1 for t, m in zip(long_seq[1:], long_mask[1:])]
    assert targets[0].tolist() == expect
    # prompt and forced tool output are -1; the sampled call and answer are targets
    p = len(prompt)
    assert (targets[0, :p - 1] == -1).all() and targets[0, p - 1:p - 1 + len(call)].tolist() == call
    assert (targets[0, p - 1 + len(call):p - 1 + len(call) + len(output)] == -1).all()
    # the short row: padded with <|assistant_end|>, padding is never a target
    m = len(short_seq)
    assert inputs[1, :m].tolist() == short_seq and (inputs[1, m:] == pad).all()
    assert targets[1, :m - 1].tolist() == [t if k else -1 for t, k in zip(short_seq[1:], short_mask[1:])]
    assert (targets[1, m - 1:] == -1).all()


def test_pg_loss_matches_a_by_hand_computation(tiny_tokenizer):
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=32, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64)
    model = perturbed(build_model(config))
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 12, 7, 12)]
    masks = [[0] * 4 + [1] * (len(s) - 4) for s in seqs]
    masks[1][6:8] = [0, 0]  # a forced tool-output stretch
    inputs, targets = rollout_batch(seqs, masks, pad_id=300)
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    num_passes, examples_per_rank = 2, 3
    total = 0.0
    for p in range(num_passes):
        x, y, a = inputs[2 * p:2 * p + 2], targets[2 * p:2 * p + 2], adv[2 * p:2 * p + 2]
        logp = -model(x, y, loss_reduction="none").view_as(y)
        loss = pg_loss(logp, y, a, num_passes, examples_per_rank)
        # by hand: log softmax of the logits at every supervised position, weighted by the row's advantage
        with torch.no_grad():
            logprobs = torch.log_softmax(model(x), dim=-1)
            s, count = 0.0, 0
            for r in range(2):
                for t in range(y.size(1)):
                    if y[r, t] >= 0:
                        s += a[r].item() * logprobs[r, t, y[r, t]].item()
                        count += 1
        expected = -s / (count * num_passes * examples_per_rank)
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
        total += loss.item()
    assert math.isfinite(total) and total != 0.0
    # no valid token (nothing sampled): a zero loss, not a division by zero
    empty = torch.full((2, 5), -1)
    assert pg_loss(torch.zeros(2, 5), empty, torch.ones(2), 1, 1).item() == 0.0


def test_rank_striding_seeds_cursor_and_pass_at_k():
    # global positions g: rank g % W; 4 problems per step over 2 ranks, cycling over 5 problems: the prompt
    # stream of a rank yields its problems of step 1, then step 2, ...
    class Echo:  # a "tokenizer" whose prompt is the problem itself
        render_for_completion = staticmethod(lambda conv: conv)

    def problems(cursor, count):
        stream = rendered_conversations(list(range(5)), Echo, None, cursor, 2, completion=True)
        return [ids for _, (_, ids, _) in zip(range(count), stream)]
    assert problems(0, 4) == [0, 2, 4, 1] and problems(1, 4) == [1, 3, 0, 2]
    assert start_cursor(None, 1, 4, 3) == 13
    saved = [{"rank": 0, "world_size": 2, "next": 12}, {"rank": 1, "world_size": 2, "next": 13}]
    assert [start_cursor(saved, r, 4, 3) for r in range(4)] == [12, 13, 14, 15]  # resume on 4 workers
    assert rollout_seed(3, 7, 1) == rollout_seed(3, 7, 1) != rollout_seed(3, 7, 0)
    assert 0 <= rollout_seed(3, 7, 1) < 2**31
    outcomes = [False, True, False]
    assert [pass_at_k(outcomes, k) for k in (1, 2, 3)] == [0.0, 1.0, 1.0]


# -----------------------------------------------------------------------------
# End to end

class ParityReward(GSM8K):
    """GSM8K rows with a reward a random tiny model earns half the time (even-length completions), so the
    advantages, and hence the gradients, are not all zero."""

    def reward(self, conversation, response):
        return float(len(response) % 2 == 0)


class CrashAt:
    """step_hook: rank `rank` dies (os._exit) before training step `step`, once (a marker file)."""

    def __init__(self, step, rank, marker):
        self.step, self.rank, self.marker = step, rank, marker

    def __call__(self, step, rank):
        if step == self.step and rank == self.rank and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)


@pytest.fixture(scope="module")
def rl_storage(tmp_path_factory, tiny_tokenizer):
    """A storage root with the tiny tokenizer, a tiny 'sft' checkpoint under every test's tag, and GSM8K files."""
    root = tmp_path_factory.mktemp("rl_storage")
    tiny_tokenizer.save(str(root / "tokenizer"))
    config = GPTConfig(sequence_len=128, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    model = build_model(config)
    for tag in TAGS:
        save_checkpoint(str(root / "chatsft_checkpoints" / tag), 7, model.state_dict(), None,
                        {"model_config": asdict(config), "step": 7})
    data = root / "task_data"
    if (SHARED_DATA / "gsm8k").exists():
        os.makedirs(data)
        os.symlink(SHARED_DATA / "gsm8k", data / "gsm8k")
    else:
        write_gsm8k(str(data), ROWS, ROWS[:4])
    return str(root)


TINY = RLConfig(model_tag="plain", num_iterations=4, device_batch_size=2, examples_per_step=2, num_samples=4,
                max_new_tokens=12, eval_every=2, eval_examples=2, save_every=2)


def plain_run(cfg, storage, tokenizer, monkeypatch, resume_step=None):
    elsewhere = storage + "_elsewhere"  # the root comes in the worker's context, not from the environment
    monkeypatch.setenv("NANOCHAT_BASE_DIR", elsewhere)
    cfg = replace(cfg, task_data=os.path.join(storage, "task_data")).resolved()
    ckpt = output_dir(cfg, storage)
    os.makedirs(ckpt, exist_ok=True)
    ctx = WorkerContext(checkpoint_dir=ckpt, base_dir=storage, metrics_path=ckpt + "/metrics.jsonl")
    train = ParityReward(split="train", data_path=os.path.join(cfg.task_data, "gsm8k"))
    summary = chat_rl_worker(cfg, ctx, run_id="plain", tokenizer=tokenizer, train_task=train, resume_step=resume_step)
    assert not os.path.exists(elsewhere)
    return summary, ckpt


def test_plain_process_trains_saves_and_resumes_exactly(rl_storage, tiny_tokenizer, monkeypatch):
    summary, ckpt = plain_run(TINY, rl_storage, tiny_tokenizer, monkeypatch)
    assert ckpt.endswith("chatrl_checkpoints/plain") and summary["step"] == 4 and list_steps(ckpt) == [2, 4]
    meta = read_meta(ckpt, 4)
    assert meta["stage"] == "rl" and meta["source"] == "sft" and meta["source_step"] == 7
    assert meta["loop_state"]["step"] == 4 and meta["loader_states"] == [{"rank": 0, "world_size": 1, "next": 8}]
    # pass@k: GSM8K = pass@1, monotone in k, in [0, 1]
    assert summary["GSM8K"] == summary["pass@1"] <= summary["pass@2"] <= 1.0 and summary["pass@1"] >= 0
    lines = [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
    steps = [r for r in lines if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and 0 <= r["reward"] <= 1 and r["rollout_tok_per_sec"] > 0 for r in steps)
    assert [r["lrm"] for r in steps] == [1.0, 0.75, 0.5, 0.25]
    assert any(0 < r["reward"] < 1 for r in steps)  # mixed groups: non-zero advantages were trained on
    assert [r["step"] for r in lines if "GSM8K" in r] == [0, 2, 4]
    # the policy moved away from the sft weights
    sft, _, _ = load_checkpoint(os.path.join(rl_storage, "chatsft_checkpoints", "plain"), 7, "cpu")
    final, _, _ = load_checkpoint(ckpt, 4, "cpu")
    assert any(not torch.equal(final[k], sft[k]) for k in sft)
    # resume from step 2: same cursor, seeds, weights and optimizer state -> the same step 4
    summary, _ = plain_run(TINY, rl_storage, tiny_tokenizer, monkeypatch, resume_step=2)
    assert summary["step"] == 4
    resumed, _, _ = load_checkpoint(ckpt, 4, "cpu")
    for k in final:
        torch.testing.assert_close(resumed[k], final[k], rtol=1e-5, atol=1e-6)


def test_launcher_two_ray_workers_report_and_a_killed_worker(rl_storage, tiny_tokenizer, ray_local, monkeypatch,
                                                             tmp_path):
    """The launcher on 2 Ray workers; then the same run with rank 1 killed right after the first checkpoint
    (step 2), before Ray has usually registered it: the restarted group must resume from the step-2 checkpoint on
    storage, not from step 0, and end with the uninterrupted run's weights."""
    from ray_jobs.chat_rl import main
    from ray_jobs.ray_train import run_trainer
    monkeypatch.setenv("NANOCHAT_BASE_DIR", rl_storage)
    # the plain loader: Ray Data rendering RL's prompts through the launcher is the speedrun test's (its start-up
    # alone is ~30 s here), the rendered stream itself test_chat_stream's
    final = main(["--storage", rl_storage, "--num-workers", "2", "--max-failures", "0", "--model-tag", "launcher",
                  "--loader", "plain",
                  "--task-data", os.path.join(rl_storage, "task_data"), "--num-iterations", "4",
                  "--device-batch-size", "2", "--examples-per-step", "2", "--num-samples", "2",
                  "--max-new-tokens", "8", "--eval-every", "-1", "--eval-examples", "2", "--save-every", "2"])
    ref = os.path.join(rl_storage, "chatrl_checkpoints", "launcher")
    assert final["step"] == 4 and list_steps(ref) == [2, 4]
    assert 0.0 <= final["GSM8K"] <= final["pass@2"] <= 1.0
    meta = read_meta(ref, 4)
    assert meta["world_size"] == 2 and [s["next"] for s in meta["loader_states"]] == [8, 9]
    lines = metrics_lines(ref)
    assert [r["step"] for r in lines if "reward" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in lines if "loss" in r)
    report = open(os.path.join(rl_storage, "report", "chat-rl.md")).read()
    assert "- GSM8K: " in report and "- pass@2: " in report

    cfg = RLConfig(**{**meta["user_config"], "model_tag": "crash"})  # the launcher's run, under another tag
    ckpt = output_dir(cfg, rl_storage)
    shutil.rmtree(ckpt, ignore_errors=True)
    os.makedirs(ckpt)
    marker = str(tmp_path / "crashed")
    final = run_trainer(chat_rl_worker, cfg, name="rl-crash", checkpoint_dir=ckpt, storage=rl_storage,
                        num_workers=2, use_gpu=False, max_failures=2,
                        worker_kwargs=dict(tokenizer=tiny_tokenizer, step_hook=CrashAt(2, 1, marker)))
    assert os.path.exists(marker)  # it really died
    assert final["step"] == 4 and list_steps(ckpt) == [2, 4]
    meta = read_meta(ckpt, 4)
    assert meta["loop_state"]["step"] == 4 and [s["next"] for s in meta["loader_states"]] == [8, 9]
    lines = metrics_lines(ckpt)
    assert [r["resumed_from"] for r in lines if "resumed_from" in r] == [2]  # the restarted group loaded step 2
    trained = Counter(r["step"] for r in lines if "reward" in r)
    assert trained == Counter({1: 1, 2: 1, 3: 1, 4: 1}), trained  # every step trained once: nothing from 0 again
    ref_model, got_model = (load_checkpoint(d, 4, "cpu")[0] for d in (ref, ckpt))
    for k in ref_model:  # same data, same optimizer state: the uninterrupted run's weights
        torch.testing.assert_close(got_model[k], ref_model[k], rtol=1e-5, atol=1e-6)


def metrics_lines(ckpt):
    return [json.loads(line) for line in open(os.path.join(ckpt, "metrics.jsonl"))]
