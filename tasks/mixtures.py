"""
The conversation mixtures of midtraining and chat SFT (the OLD recipe).

With task_data=None every task loads from the HuggingFace Hub (nanochat's recipe). With task_data=DIR the tasks
read local files laid out like the shipped pack nanochat/data/tasks/ (the entry point decides which, see
nanochat.flags.task_data_dir), which holds no SmolTalk and no MMLU auxiliary_train; offline, the substitutes are
(logged):
- SmolTalk -> DIR/chat/chatterbot_english_conversations.jsonl.gz (train), fastchat_reference_conversations (val)
- MMLU auxiliary_train (multiple-choice practice) -> ARC-Easy + ARC-Challenge train
Identity conversations (CustomJSON) are used when `identity` (a JSONL path) exists, else left out.
`scale` shrinks the synthetic spelling tasks (and nothing else) for small runs.
"""
import logging
import os

from nanochat import storage
from tasks.arc import ARC
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee

logger = logging.getLogger("nanochat")


def _chat(split, task_data):
    if task_data is None:
        return SmolTalk(split=split)
    name = "chatterbot_english_conversations" if split == "train" else "fastchat_reference_conversations"
    return SmolTalk(split=split, data_path=os.path.join(task_data, "chat", f"{name}.jsonl.gz"))


def _mc_practice(task_data):
    if task_data is None:
        return [MMLU(subset="auxiliary_train", split="train")]
    logger.warning("offline task data has no MMLU auxiliary_train: using ARC-Easy + ARC-Challenge train instead")
    return [ARC("ARC-Easy", "train", data_path=os.path.join(task_data, "arc", "ARC-Easy")),
            ARC("ARC-Challenge", "train", data_path=os.path.join(task_data, "arc", "ARC-Challenge"))]


def _gsm8k(split, task_data, **kwargs):
    return GSM8K(split=split, data_path=None if task_data is None else os.path.join(task_data, "gsm8k"), **kwargs)


def _mmlu_test(task_data, **kwargs):
    return MMLU(subset="all", split="test", data_path=None if task_data is None else os.path.join(task_data, "mmlu"),
                **kwargs)


def _words(task_data):
    path = None if task_data is None else os.path.join(task_data, "words", "words_alpha.zip")
    return path if path and os.path.exists(path) else None


def _identity(identity):
    if identity and storage.isfile(identity):
        return [CustomJSON(identity)]
    return []


def mid_mixture(split, task_data=None, identity=None, scale=1.0):
    """Midtraining: chat + multiple choice + GSM8K tool use + spelling + identity (x2)."""
    if split == "train":
        words = _words(task_data)
        ident = _identity(identity)
        tasks = [_chat("train", task_data), *_mc_practice(task_data), _gsm8k("train", task_data), *ident, *ident,
                 SimpleSpelling(size=max(1, int(200_000 * scale)), split="train", words_path=words),
                 SpellingBee(size=max(1, int(80_000 * scale)), split="train", words_path=words)]
    else:
        tasks = [_chat("test", task_data), _mmlu_test(task_data, stop=5200), _gsm8k("test", task_data, stop=420)]
    return TaskMixture(tasks)


def sft_mixture(split, task_data=None, identity=None, scale=1.0):
    """Chat SFT (OLD): ARC-Easy/Challenge + GSM8K + 10K chat + identity + a little spelling."""
    if split != "train":
        return _chat("test", task_data)
    arc_dir = None if task_data is None else os.path.join(task_data, "arc")
    words = _words(task_data)
    tasks = [ARC("ARC-Easy", "train", data_path=arc_dir and os.path.join(arc_dir, "ARC-Easy")),
             ARC("ARC-Challenge", "train", data_path=arc_dir and os.path.join(arc_dir, "ARC-Challenge")),
             _gsm8k("train", task_data), SmolTalk(split="train", stop=10_000) if task_data is None else
             _chat("train", task_data), *_identity(identity),
             SimpleSpelling(size=max(1, int(300 * scale)), split="train", words_path=words),
             SpellingBee(size=max(1, int(300 * scale)), split="train", words_path=words)]
    return TaskMixture(tasks)
