"""
Compression of our tokenizer (bytes per token, higher is better) on fixed sample texts and on the source's first
train and val units, next to GPT-2 and GPT-4 (cl100k_base) when tiktoken can load them (it downloads them once;
offline they are skipped with a note).

    python -m ray_jobs.tok_eval [--data SOURCE] [--storage ROOT]

A few documents and three tokenizers: this runs in the job's driver process, there is nothing to distribute.
"""
import threading
from dataclasses import dataclass

from nanochat.common import get_base_dir
from nanochat.flags import ArgsMixin, flag, storage_flag

# Short texts in the spirit of nanochat's tok_eval, written for this project.
NEWS = """\
GENEVA (Reuters) - Delegates from more than forty countries agreed on Thursday to a framework for sharing river \
data across borders, ending two weeks of talks that had stalled over how often upstream dams must report their \
water releases. "This is not a treaty, but it is the first time everyone has agreed to publish the same numbers \
on the same day," said the conference chair, adding that a technical committee would meet again in March. \
Environmental groups welcomed the deal but warned that it carries no penalties for countries that fall behind."""

KOREAN = """\
서울의 한 작은 도서관은 매주 토요일 아침마다 어린이들을 위한 이야기 시간을 연다. 자원봉사자들은 그림책을 읽어 \
주고, 아이들은 이야기 속 인물에 대해 질문을 하거나 자신만의 결말을 지어 보기도 한다. 도서관 측은 올해 참가자가 \
작년보다 두 배 가까이 늘었다며, 다음 달부터는 부모와 함께하는 글쓰기 모임도 시작할 계획이라고 밝혔다."""

CODE = """\
def merge_intervals(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    \"\"\"Merge overlapping closed intervals, e.g. [(1, 3), (2, 6), (8, 10)] -> [(1, 6), (8, 10)].\"\"\"
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


if __name__ == "__main__":
    print(merge_intervals([(5, 7), (1, 2), (2, 4)]))  # [(1, 4), (5, 7)]
"""

MATH = r"""\begin{theorem}[Cauchy--Schwarz]
For all vectors $u, v$ in an inner product space $V$,
\[ |\langle u, v \rangle|^2 \le \langle u, u \rangle \cdot \langle v, v \rangle . \]
\end{theorem}
\begin{proof}
If $v = 0$ both sides vanish. Otherwise let $\lambda = \langle u, v \rangle / \langle v, v \rangle$; then
$0 \le \| u - \lambda v \|^2 = \|u\|^2 - \frac{|\langle u, v \rangle|^2}{\|v\|^2}$, which rearranges to the claim.
\end{proof}"""

SCIENCE = """\
Photosynthesis in most plants takes place in the chloroplasts, where chlorophyll absorbs mainly red and blue light. \
In the light-dependent reactions, water molecules are split, releasing oxygen and producing ATP and NADPH. These \
carriers then power the Calvin cycle, in which the enzyme RuBisCO fixes carbon dioxide into three-carbon sugars. \
Because RuBisCO also reacts with oxygen, hot and dry conditions waste energy through photorespiration, a problem \
that C4 and CAM plants reduce by concentrating CO2 around the enzyme."""

SAMPLES = {"news": NEWS, "korean": KOREAN, "code": CODE, "math": MATH, "science": SCIENCE}
BASELINES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}


def load_tiktoken(name, timeout=20):
    """tiktoken's named encoding, or (None, reason) when it cannot be loaded (offline: tiktoken downloads it once;
    a thread with a timeout so an unreachable network cannot hang the job)."""
    import tiktoken
    result = {}

    def load():
        try:
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as e:  # no network, no cache
            result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout)
    return result.get("enc"), result.get("error", f"timed out after {timeout}s")


def source_samples(spec, root):
    """The first train and val unit of the source ('hub': the shards under the storage root `root`), each joined
    into one text (like nanochat's fineweb rows)."""
    from nanochat.dataset import resolve_source
    src = resolve_source(spec, base_dir=root)
    return {f"{split}-docs": "\n".join(src.read_unit(src.units(split)[0])) for split in ("train", "val")}, src


@dataclass
class TokEvalConfig(ArgsMixin):
    data: str = flag("hub", "where the train / val documents come from: hub | auto | fallback | a file, dir or glob")
    storage: str | None = storage_flag()


def parser():
    return TokEvalConfig.parser(__doc__)


def main(argv=None):
    args = TokEvalConfig.from_args(parser().parse_args(argv))
    root = get_base_dir(args.storage)

    from nanochat.tokenizer import get_tokenizer
    encoders = {"ours": get_tokenizer(root).enc}
    notes = []
    for label, name in BASELINES.items():
        enc, error = load_tiktoken(name)
        if enc is None:
            notes.append(f"{label} ({name}) skipped: tiktoken cannot load it here ({error})")
        else:
            encoders[label] = enc
    docs, src = source_samples(args.data, root)
    texts = {**SAMPLES, **docs}

    results = {label: {} for label in encoders}
    for label, enc in encoders.items():
        for name, text in texts.items():
            n_bytes, n_tokens = len(text.encode("utf-8")), len(enc.encode_ordinary(text))
            results[label][name] = {"bytes": n_bytes, "tokens": n_tokens, "ratio": n_bytes / n_tokens}

    # table: one row per text, tokens and bytes/token per tokenizer
    header = f"{'text':<12}{'bytes':>8}" + "".join(f"{label + ' tok':>12}{'ratio':>7}" for label in encoders)
    print(f"Compression (bytes per token; higher is better). Source docs: {src.description}")
    print(header)
    print("-" * len(header))
    for name, text in texts.items():
        row = f"{name:<12}{len(text.encode('utf-8')):>8}"
        for label in encoders:
            r = results[label][name]
            row += f"{r['tokens']:>12}{r['ratio']:>7.2f}"
        print(row)
    for note in notes:
        print("note:", note)
    from nanochat.report import get_report
    get_report(root).log("Tokenizer evaluation", [
        {"source": src.description},
        *({f"{label} bytes/token ({name})": round(r["ratio"], 3) for name, r in per_text.items()}
          for label, per_text in results.items()), *notes])
    return {"ratios": {label: {k: round(v["ratio"], 3) for k, v in r.items()} for label, r in results.items()},
            "results": results, "skipped": notes, "source": src.description}


if __name__ == "__main__":
    main()
