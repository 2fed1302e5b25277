"""lm-evaluation-harness pointed at the model two ways, as its users do: `local-completions` against the running serve
app (the OpenAI-compatible /v1/completions with echo and logprobs, the server's own tokenizer through /tokenize) and
`hf` on the Hugging Face export of the same weights. A small multiple-choice task, a local YAML over items the test
writes: both must score every choice alike and so pick the same answer on every item. (The serve app runs without
Ray here, on uvicorn; test_serve.py runs the same app under Ray Serve.)"""
import json
import random

import pytest

from bench.bench_serve import LocalServer
from nanochat.hf_format import export_hf
from serve.api import make_api
from serve.app import ServeConfig
from serve.service import ChatService
from test_serve import tiny_chat_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is in the dev extra: pip install -e '.[dev]'")

TASK_YAML = """\
task: nanochat_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

WORDS = ["fox", "dog", "sun", "rain", "blue", "green", "seven", "twelve", "hello", "world", "temperature", "theory"]


def write_task(directory, n_items=12, seed=0):
    rng = random.Random(seed)
    items = [{"question": f"Question {i}: what comes after {rng.choice(WORDS)} and {rng.choice(WORDS)}?",
              "choices": [" ".join(rng.sample(WORDS, 2)) for _ in range(3)], "answer": rng.randrange(3)}
             for i in range(n_items)]
    data = directory / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (directory / "nanochat_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    return items


def run(task_dir, model, model_args):
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["nanochat_tiny_mc"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    samples = sorted(out["samples"]["nanochat_tiny_mc"], key=lambda s: s["doc_id"])
    # per item: each choice's log-likelihood (of its tokens after the question), and the choice picked
    scores = [[resp[0] for resp in s["filtered_resps"]] for s in samples]
    return out["results"]["nanochat_tiny_mc"]["acc,none"], scores


def test_the_endpoint_and_the_export_score_alike(tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    items = write_task(task_dir)
    model = tiny_chat_model(tiny_tokenizer)
    export_hf(model, tiny_tokenizer, str(tmp_path / "export"))
    service = ChatService(ServeConfig(max_batch=8), model, tiny_tokenizer)
    try:
        with LocalServer(make_api(service)) as srv:
            acc_api, api = run(task_dir, "local-completions",
                               f"base_url={srv.url}/v1/completions,model=nanochat,tokenizer_backend=remote,"
                               f"num_concurrent=1,max_retries=1,max_length=1024")
    finally:
        service.close()
    acc_hf, hf = run(task_dir, "hf", f"pretrained={tmp_path / 'export'},trust_remote_code=True,dtype=float32,"
                                     f"device=cpu,batch_size=4")
    assert len(api) == len(hf) == len(items) and all(len(s) == 3 for s in api)
    for i, (a, h) in enumerate(zip(api, hf)):
        assert a == pytest.approx(h, abs=1e-3), (i, a, h)
        assert max(range(3), key=a.__getitem__) == max(range(3), key=h.__getitem__), (i, a, h)
    assert acc_api == acc_hf
