"""Quality of an artifact: perplexity over a text, KL divergence and top-1 agreement vs a reference.

Everything is computed through the runtime's own backends (llama.cpp for GGUF, LiteRT for
.tflite, onnxruntime-genai for an ONNX folder; see ``scorers.py``), so the numbers describe what
users run, and artifacts of one model compare across formats on the same token ids.

Perplexity follows llama.cpp's ``llama-perplexity`` exactly (tools/perplexity/perplexity.cpp):
the whole text is tokenized once (special tokens added, one trailing newline dropped as its
``-f`` does), cut into ``n_ctx``-token windows, the first token of each window replaced by BOS
when the model adds one, and only the second half of each window scored (predictions from
position ``n_ctx/2`` to ``n_ctx-2``); the mean negative log-likelihood over every scored token of
every window, exponentiated. KL divergence (``KL(P_ref || P_cand)``)
and top-1 agreement use the same windows and positions, on the reference's tokens. The same
measure prices a quantized KV cache (``kv_type_costs``): one GGUF scored with a q8_0 or q4_0
cache against itself with an f16 cache.

Without a text, the reference writes its own: it continues a fixed set of prompts (sampled with a
fixed seed) and the continuations are scored. Perplexity is then not available: a model's
perplexity on text it wrote itself measures nothing.

Memory stays bounded by one decode batch: logits are read batch by batch and reduced to sums
(float64 log-softmax in blocks of rows); nothing is kept across windows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_runtime.converters.scorers import RowQueue, Scorer, Window
from edge_runtime.errors import EdgeRuntimeError, InvalidConfigError

DEFAULT_CTX = 512  # llama-perplexity's default, so numbers compare with published ones
# Prompts the reference continues when no text is given: prose, dialogue, code, lists, facts.
GENERATION_PROMPTS = (
    "The history of the printing press begins",
    "Dear Sam,\n\nThank you for your letter. I wanted to tell you",
    "def parse_config(path):\n    \"\"\"Read a configuration file and",
    "Three things to check before a long bicycle trip:\n1.",
    "Photosynthesis is the process by which",
    "Q: Why is the sky blue?\nA:",
)
# The KV cache types whose cost the evaluator measures against f16 (what the planner may choose).
KV_TYPES_MEASURED = ("q8_0", "q4_0")
GENERATED_TOKENS = 128  # per prompt (fewer when the context is smaller)
GENERATION_SEED = 1234
# Rows of logits converted to float64 at once: 64 x 49k vocab x 8 bytes = 25 MB.
_ROWS_PER_BLOCK = 64

Progress = Callable[[int, int], None]  # (windows done, windows in all)


@dataclass(frozen=True)
class QualityReport:
    """How close a candidate artifact is to its reference, and its perplexity on a text."""

    ppl: float | None  # None without a text
    ppl_ref: float | None  # the reference's perplexity on the same tokens
    delta_ppl_pct: float | None  # (ppl / ppl_ref - 1) * 100
    kld_mean: float | None  # mean KL(P_ref || P_cand) in nats; None without a reference
    top1_agreement: float | None  # fraction of positions whose argmax agrees
    n_tokens: int  # scored positions
    n_chunks: int  # windows
    n_ctx: int
    text_sha256: str | None  # of the text file, or of the generated tokens
    text_source: str = "file"  # "file" or "generated"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QualityReport:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class _Tally:
    """Running sums for one candidate (and the reference's NLL on the same positions)."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.nll_ref = 0.0
        self.kld = 0.0
        self.same_top = 0
        self.count = 0


def log_softmax(rows: Any) -> Any:
    """Row-wise log-softmax in float64 (the logits arrive as float32)."""
    import numpy as np

    x = np.asarray(rows, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _accumulate(tally: _Tally, targets: list[int], cand_rows: Any, ref_rows: Any | None) -> None:
    import numpy as np

    idx = np.asarray(targets)
    for lo in range(0, len(targets), _ROWS_PER_BLOCK):
        hi = min(lo + _ROWS_PER_BLOCK, len(targets))
        sel = np.arange(hi - lo)
        cand = log_softmax(cand_rows[lo:hi])
        tally.nll -= float(cand[sel, idx[lo:hi]].sum())
        tally.count += hi - lo
        if ref_rows is None:
            continue
        ref = log_softmax(ref_rows[lo:hi])
        tally.nll_ref -= float(ref[sel, idx[lo:hi]].sum())
        tally.kld += float((np.exp(ref) * (ref - cand)).sum())
        tally.same_top += int((ref.argmax(axis=1) == cand.argmax(axis=1)).sum())


def read_text(path: str | Path) -> tuple[str, str]:
    """A text file as llama-perplexity reads it (one trailing newline dropped), and its sha256."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise InvalidConfigError(f"{file}: no such text file", "give --text a plain UTF-8 text file") from None
    except OSError as exc:
        raise InvalidConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidConfigError(f"{file}: not UTF-8 text (byte {exc.start})",
                                 "give --text a plain UTF-8 text file") from None
    return text.removesuffix("\n"), hashlib.sha256(raw).hexdigest()


def text_windows(tokens: Sequence[int], n_ctx: int, n_chunks: int | None, bos: int | None) -> list[Window]:
    """llama-perplexity's windows: ``n_ctx`` tokens each, BOS first when the model adds one."""
    if n_ctx < 8:
        raise InvalidConfigError(f"a context of {n_ctx} tokens is too small to score", "use --ctx 128 or more")
    if len(tokens) < 2 * n_ctx:
        raise InvalidConfigError(
            f"the text is {len(tokens)} tokens; perplexity with a context of {n_ctx} needs {2 * n_ctx}",
            "give a longer --text or a smaller --ctx")
    n_max = len(tokens) // n_ctx
    count = n_max if n_chunks is None else max(1, min(n_chunks, n_max))
    windows = []
    for i in range(count):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        windows.append(Window(tuple(chunk), n_ctx // 2))
    return windows


def generated_windows(reference: str | Path, n_ctx: int, threads: int | None) -> tuple[list[Window], str]:
    """Windows of text the reference writes itself from ``GENERATION_PROMPTS`` (seeded sampling)."""
    from edge_runtime.backends import load_artifact
    from edge_runtime.backends.base import SamplingParams, Settings
    from edge_runtime.models.spec import find_artifacts

    digest = hashlib.sha256()
    windows = []
    with load_artifact(find_artifacts(str(reference)), Settings(n_ctx=n_ctx, n_threads=threads)) as model:
        for prompt in GENERATION_PROMPTS:
            prompt_tokens = model.tokenize(prompt, add_bos=model.info.add_bos)
            budget = min(GENERATED_TOKENS, n_ctx - len(prompt_tokens) - 1)
            if budget < 2:
                raise InvalidConfigError(f"a context of {n_ctx} tokens leaves no room to generate",
                                         "use --ctx 128 or more")
            model.reset()
            params = SamplingParams(max_tokens=budget, temperature=0.8, top_k=40, top_p=0.95,
                                    min_p=0.05, seed=GENERATION_SEED)
            generated = [e.token for e in model.generate(prompt_tokens, params) if e.token is not None]
            if len(generated) < 2:
                continue  # the model stopped at once: nothing to score
            tokens = tuple(prompt_tokens + generated)
            digest.update(repr(tokens).encode())
            windows.append(Window(tokens, len(prompt_tokens) - 1))
    if not windows:
        raise EdgeRuntimeError("the reference model generated no text to compare on",
                               "give a text file with --text")
    return windows, digest.hexdigest()


def compare(
    candidates: Sequence[str | Path],
    reference: str | Path | None = None,
    *,
    text: str | Path | None = None,
    n_ctx: int = DEFAULT_CTX,
    n_chunks: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    generated: tuple[list[Window], str] | None = None,
) -> list[QualityReport]:
    """One report per candidate: perplexity over ``text``, KLD and top-1 against ``reference``.

    The reference's logits are computed once per decode batch and every candidate is compared
    with them, so all models are loaded together (memory-mapped). Without ``text`` the reference
    generates the text (and perplexity is None), unless ``generated`` (``generated_windows``'
    result) hands over what it wrote before; without a reference only perplexity is measured.
    """
    if reference is None and text is None:
        raise InvalidConfigError("perplexity needs a text", "give --text FILE (or a --reference to compare with)")
    if not candidates:
        raise InvalidConfigError("no artifact to evaluate")
    return _compare([(c, "f16") for c in candidates], (reference, "f16") if reference is not None else None,
                    text=text, n_ctx=n_ctx, n_chunks=n_chunks, threads=threads, progress=progress,
                    generated=generated)


def kv_type_costs(
    artifact: str | Path,
    *,
    kv_types: Sequence[str] = KV_TYPES_MEASURED,
    text: str | Path | None = None,
    n_ctx: int = DEFAULT_CTX,
    n_chunks: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    generated: tuple[list[Window], str] | None = None,
) -> dict[str, dict[str, Any]]:
    """What each quantized KV cache type costs a GGUF artifact: ``{"q8_0": {"kld", "top1_agreement"}}``,
    KL divergence and top-1 agreement against the same artifact with an f16 KV cache, on the same
    windows as ``compare`` (the manifest's ``quality.kv_cache_types``, which the planner reads).

    A type llama.cpp cannot make a context with for this model (a head size its blocks do not
    divide) is ``{"unsupported": why}``, so the planner never picks it.
    """
    from edge_runtime.errors import ModelLoadError

    if Path(artifact).suffix.lower() != ".gguf":
        raise InvalidConfigError(f"{Path(artifact).name}: only llama.cpp (GGUF) quantizes its KV cache")
    out: dict[str, dict[str, Any]] = {}
    for kv in kv_types:
        try:
            Scorer(artifact, n_ctx, threads, kv).close()
        except ModelLoadError as exc:
            out[kv] = {"unsupported": exc.message}
    usable = [kv for kv in kv_types if kv not in out]
    reports = _compare([(artifact, kv) for kv in usable], (artifact, "f16"), text=text, n_ctx=n_ctx,
                       n_chunks=n_chunks, threads=threads, progress=progress, generated=generated) if usable else []
    for kv, r in zip(usable, reports, strict=True):
        kld = r.kld_mean
        if kld is None or not math.isfinite(kld):  # no scored token, or an overflow: not a figure to plan by
            out[kv] = {"unsupported": f"its KL divergence against f16 KV could not be measured ({kld})"}
        else:  # a rounding error can come out a hair below zero
            out[kv] = {"kld": max(0.0, kld), "top1_agreement": r.top1_agreement}
    return {kv: out[kv] for kv in kv_types}


def _compare(candidates: list[tuple[str | Path, str]], reference: tuple[str | Path, str] | None, *,
             text: str | Path | None, n_ctx: int, n_chunks: int | None, threads: int | None,
             progress: Progress | None, generated: tuple[list[Window], str] | None) -> list[QualityReport]:
    """``compare`` on (artifact, KV cache type) pairs: the reference and the candidates may be one file."""
    windows: list[Window] = []
    source = "file" if text is not None else "generated"
    if text is not None:
        body, text_sha = read_text(text)  # before any model loads: a bad path fails at once
    elif generated is not None:
        windows, text_sha = generated
    else:
        windows, text_sha = generated_windows(reference[0], n_ctx, threads)  # type: ignore[index]
    scorers: list[Scorer] = []
    try:
        for path, kv in ([reference] if reference is not None else []) + list(candidates):
            scorers.append(Scorer(path, n_ctx, threads, kv))
        ref = scorers[0] if reference is not None else None
        cands = scorers[1:] if ref is not None else scorers
        lead = scorers[0]
        for s in cands:
            if s.n_vocab != lead.n_vocab:
                raise InvalidConfigError(
                    f"{Path(s.path).name} has {s.n_vocab} tokens, {Path(lead.path).name} {lead.n_vocab}",
                    "compare artifacts of the same model (one tokenizer)")
        if text is not None:
            windows = text_windows(lead.tokenize(body), n_ctx, n_chunks, lead.bos if lead.add_bos else None)
        tallies = [_Tally() for _ in cands]
        for done, window in enumerate(windows):
            _score_window(window, ref, cands, tallies)
            if progress is not None:
                progress(done + 1, len(windows))
        return [_report(t, ref is not None, source, len(windows), n_ctx, text_sha) for t in tallies]
    finally:
        for s in scorers:
            s.close()


def _score_window(window: Window, ref: Scorer | None, cands: list[Scorer], tallies: list[_Tally]) -> None:
    if ref is None:
        for scorer, tally in zip(cands, tallies, strict=True):
            for targets, rows in scorer.logit_batches(window):
                _accumulate(tally, targets, rows, None)
        return
    # Each reference batch is held only while every candidate yields the same positions (their
    # own batches may be cut differently: a queue per candidate lines the rows up).
    queues = [RowQueue(s.logit_batches(window)) for s in cands]
    for targets, ref_rows in ref.logit_batches(window):
        for queue, tally in zip(queues, tallies, strict=True):
            cand_targets, cand_rows = queue.take(len(targets))
            if cand_targets != targets:
                raise EdgeRuntimeError("internal error: reference and candidate positions differ")
            _accumulate(tally, targets, cand_rows, ref_rows)


def _report(t: _Tally, has_ref: bool, source: str, n_chunks: int, n_ctx: int, sha: str) -> QualityReport:
    with_text = source == "file"
    ppl = math.exp(t.nll / t.count) if with_text and t.count else None
    ppl_ref = math.exp(t.nll_ref / t.count) if with_text and has_ref and t.count else None
    return QualityReport(
        ppl=ppl,
        ppl_ref=ppl_ref,
        delta_ppl_pct=(ppl / ppl_ref - 1.0) * 100.0 if ppl is not None and ppl_ref else None,
        kld_mean=t.kld / t.count if has_ref and t.count else None,
        top1_agreement=t.same_top / t.count if has_ref and t.count else None,
        n_tokens=t.count, n_chunks=n_chunks, n_ctx=n_ctx, text_sha256=sha, text_source=source,
    )


def evaluate(
    candidate: str | Path,
    reference: str | Path | None = None,
    *,
    text: str | Path | None = None,
    n_ctx: int = DEFAULT_CTX,
    n_chunks: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> QualityReport:
    """Quality of one artifact: ``compare`` with a single candidate."""
    return compare([candidate], reference, text=text, n_ctx=n_ctx, n_chunks=n_chunks,
                   threads=threads, progress=progress)[0]
