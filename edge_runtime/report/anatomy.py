"""The latency anatomy in the report: one reply's time split into load, prefill, decode and transfer.

From a result's ``anatomy`` (``edgert bench --anatomy``) and its method: the reply to a short and
to a long prompt (the bench's shortest and longest prompt lengths, ``gen_tokens`` answered), each
term in seconds, the one that dominates, and the lever that moves it.

- load: the cold load (a first reply pays it; a running server has paid it already);
- prefill: the prompt at the best prefill speed of the thread scaling curve;
- decode: the tokens after the first at the best decode speed;
- transfer: what streaming over loopback HTTP adds to the in-process TTFT (at least 0).
"""

from __future__ import annotations

from typing import Any

from edge_runtime.report.tables import DeviceRun, Table, fmt_num

TERMS = ("load", "prefill", "decode", "transfer")

LEVERS = {
    "load": "mmap/preload: keep the model loaded (edgert serve) or its pages warm; a cold load reads the "
            "whole file from storage",
    "prefill": "prompt cache and batching: reuse the evaluated prefix (a chat's earlier turns); more threads "
               "help prefill, which is compute-bound",
    "decode": "quantization: decode reads every weight per token, so fewer bytes per token (a smaller quant) "
              "is the lever; threads help only up to the memory bandwidth",
    "transfer": "call the model in-process (the Python API) instead of over HTTP, or batch requests",
}


def _best(curve: dict[str, float]) -> tuple[int, float]:
    """(threads, speed) at the fastest point of a thread scaling curve."""
    threads, speed = max(curve.items(), key=lambda kv: kv[1])
    return int(threads), speed


def reply_breakdown(anatomy: dict[str, Any], prompt_tokens: int, gen_tokens: int) -> dict[str, float]:
    """Seconds per term of one reply to a ``prompt_tokens`` prompt with ``gen_tokens`` answered."""
    compute, transfer = anatomy["compute"], anatomy["transfer"]
    prefill = _best(compute["prefill_tok_s"])[1]
    decode = _best(compute["decode_tok_s"])[1]
    return {
        # a cold mmap load returns before the weights are read: the first prefill pages them in
        "load": anatomy["storage"]["cold_load_s"] + anatomy["storage"].get("first_prefill_pagein_s", 0.0),
        "prefill": prompt_tokens / prefill if prefill > 0 else 0.0,
        "decode": (gen_tokens - 1) / decode if decode > 0 else 0.0,
        "transfer": max(0.0, (transfer["http_ttft_ms"] - transfer["in_process_ttft_ms"]) / 1000),
    }


def dominant(terms: dict[str, float]) -> str:
    """The term that takes the longest."""
    return max(terms, key=lambda t: terms[t])


def replies(run: DeviceRun) -> list[tuple[str, str, dict[str, float]]]:
    """(result label, "short"/"long" with its prompt length, terms) for every result with an anatomy."""
    method = run.result.method
    lengths = (("short", method.prompt_tokens[0]), ("long", method.prompt_tokens[-1]))
    out = []
    for r in run.result.results:
        if r.anatomy is None:
            continue
        for name, n in lengths:
            out.append((f"{r.label} · {r.backend} · {r.threads}t",
                        f"{name} ({n} tok)", reply_breakdown(r.anatomy, n, method.gen_tokens)))
    return out


def anatomy_table(run: DeviceRun) -> Table | None:
    """Each reply's terms, the dominant one and its lever; None without anatomy figures."""
    rows = []
    for label, prompt, terms in replies(run):
        top = dominant(terms)
        total = sum(terms.values())
        share = terms[top] / total if total > 0 else 0.0
        rows.append((label, prompt, *(fmt_num(terms[t], ".3f") for t in TERMS), fmt_num(total, ".3f"),
                     f"{top} ({share:.0%})", LEVERS[top]))
    if not rows:
        return None
    caption = "; ".join(_detail_lines(run))
    return Table("Latency anatomy of one reply (seconds)",
                 ("Result", "Prompt", *TERMS, "total", "dominant", "lever"), tuple(rows), caption)


def _detail_lines(run: DeviceRun) -> list[str]:
    """What the terms leave out: warm against cold loads, page-in, scaling, the cache's TTFTs."""
    lines = []
    for r in run.result.results:
        a = r.anatomy
        if a is None:
            continue
        s, c, cache = a["storage"], a["compute"], a["cache"]
        best_threads, _ = _best(c["decode_tok_s"])
        restored = cache.get("restored_ttft_ms")
        no_mmap = s.get("cold_load_no_mmap_s")
        lines.append(
            f"{r.label}: load cold {fmt_num(s['cold_load_s'], '.2f')} s / warm {fmt_num(s['warm_load_s'], '.2f')} s, "
            f"first-prefill page-in {fmt_num(s['first_prefill_pagein_s'], '.2f')} s"
            + (f", without mmap cold {fmt_num(no_mmap, '.2f')} s" if no_mmap is not None else "")
            + f"; decode fastest at {best_threads} thread(s); chat TTFT cold {fmt_num(cache['cold_ttft_ms'], '.0f')} ms"
            + (f", restored {fmt_num(restored, '.0f')} ms" if restored is not None else
               f", restored n/a ({cache.get('restored_note') or 'not measured'})")
            + f", hot {fmt_num(cache['hot_ttft_ms'], '.0f')} ms")
    return lines
