"""Helpers for the evaluation tests: a char-level tokenizer and a tiny Llama built in code, GSM8K-style
data files, a deterministic clock and fake generation / refinement functions."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vps.evaluation import MethodSpec, RunDir, RunSettings, data_info, load_items
from vps.refinement import RefineConfig
from vps.refinement.gains import GainOptimizer
from vps.verify import extract_answer

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
SYSTEM = "Solve."

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many?", "3 + 4 = <<3+4=7>>7\n#### 7"),
    ("A box holds 6 pens. How many pens in 2 boxes?", "6 * 2 = <<6*2=12>>12\n#### 12"),
    ("Sam had 10 cents and spent 4. What is left?", "10 - 4 = 6\n#### 6"),
    ("There are 9 cats; 3 leave. How many stay?", "9 - 3 = 6 cats stay.\n#### 6"),
    ("Each of 5 kids has 2 toys. How many toys?", "5 * 2 = 10\n#### 10"),
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, plus pad / eos / bos / unk and a chat template."""
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def tiny_model(tok: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg).eval()


def write_data(path: Path, malformed: bool = False) -> Path:
    """A GSM8K-style JSONL file; with ``malformed`` a bad JSON line (line 3) and a line missing 'answer'."""
    lines = [json.dumps({"question": q, "answer": a}) for q, a in QUESTIONS]
    if malformed:
        lines.insert(2, '{"question": "broken", "answer": ')
        lines.append(json.dumps({"question": "no answer field"}))
    path.write_text("\n".join(lines) + "\n")
    return path


class Clock:
    """A clock that advances by ``step`` on every reading, so timings are reproducible."""

    def __init__(self, step: float = 0.5) -> None:
        self.t = 0.0
        self.step = step

    def __call__(self) -> float:
        self.t += self.step
        return self.t


def settings_for(path: Path, **overrides: Any) -> tuple[list, RunSettings]:
    loaded = load_items(path)
    kw: dict[str, Any] = dict(model="tiny-llama", data=data_info(loaded, str(path)), max_new_tokens=4,
                              system=SYSTEM, nll=True)
    kw.update(overrides)
    return loaded.items, RunSettings(**kw)


def fake_generate(correct_ids: dict[str, set[int]]):
    """A generate function answering item i correctly iff i is in ``correct_ids[config-kind]``.

    The item is recognised from its prompt; the method from whether the model is patched.
    """
    from vps.patching import is_patched

    def generate(model, tokenizer, prompts, max_new_tokens, temperature, seed, stop_strings=None):
        kind = "vps" if is_patched(model) else "base"
        texts = []
        for p in prompts:
            i = next(k for k, (q, _) in enumerate(QUESTIONS) if q in p)
            gold = QUESTIONS[i][1].rsplit("#### ", 1)[1]
            texts.append(f"so #### {gold}" if i in correct_ids[kind] else "so #### 999")
        return texts, [3] * len(prompts)

    return generate


@dataclass
class FakeRefineResult:
    oracle: bool
    mode: str
    best_text: str
    best_answer: Any
    trace: list[dict] = field(default_factory=list)
    seconds: float = 0.01
    tokens: int = 7

    def to_dict(self) -> dict[str, Any]:
        return {"oracle": self.oracle, "mode": self.mode, "best_text": self.best_text, "trace": self.trace,
                "seconds": self.seconds, "tokens": self.tokens}


class FakeRefine:
    """Records its calls (one per prompt); the oracle mode answers with the gold it was given, self mode with 999."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.batches: list[int] = []
        self.samplings: list[str] = []

    def __call__(self, model, tokenizer, prompts, golds=None, config=None, verifier=None, sample_cache=None):
        config = config if config is not None else RefineConfig()
        mode, iters, sampling = config.mode, config.iters, config.sampling
        self.batches.append(len(prompts))
        self.samplings.append(sampling)
        out = []
        for i, prompt in enumerate(prompts):
            gold = None if golds is None else golds[i]
            self.calls.append({"prompt": prompt, "gold": gold, "mode": mode, "iters": iters})
            if mode == "oracle" and gold is None:
                raise ValueError("oracle mode needs gold")
            text = f"#### {gold:g}" if mode == "oracle" else "#### 999"
            out.append(FakeRefineResult(oracle=mode == "oracle", mode=mode, best_text=text,
                                        best_answer=extract_answer(text), trace=[{"iter": 0, "text": text}]))
        return out


SPECS = [MethodSpec("base", "base"), MethodSpec("vps", "vps")]


def rows_by_config(out: Path) -> dict[str, list[dict]]:
    """A run directory's rows per configuration, in item order."""
    rows: dict[str, list[dict]] = {}
    for r in sorted(RunDir(out).read_rows(), key=lambda r: r["index"]):
        rows.setdefault(r["config"], []).append(r)
    return rows


def stop_inside(texts: list[str]) -> str:
    """A two-character stop string that one of ``texts`` (outputs generated without stops) holds well before its
    end, with no whitespace at its edges; StopIteration if none does (then a stop test would prove nothing)."""
    return next(t[2:4] for t in texts if len(t) > 6 and t[2:4].strip() == t[2:4])


class RecordingGains(GainOptimizer):
    """A `GainOptimizer` that keeps the gradient each step moved along (``recorded``), for tests that compare the
    surrogate step's gradient across ways of computing it."""

    def step(self):
        self.recorded = self.gradient().clone()
        return super().step()
