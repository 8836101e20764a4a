#!/usr/bin/env python3
"""Time to first token over a 10-turn chat, with and without KV prefix reuse.

Two copies of the model hold one conversation each, turn by turn in alternation:

- ``reuse``: a plain ``Session``; the model keeps its KV cache between turns and evaluates only
  the tokens that differ from what it already holds (the product's behaviour);
- ``no reuse``: the same conversation, with ``model.reset()`` before every turn, so the whole
  history is evaluated again each time.

Both conversations send the same user messages and keep the same history (the no-reuse side's
answer is replaced by the reuse side's when greedy decoding differs, so prompts stay equal).
TTFT is measured around ``Session.send``: from the call (which renders the chat template and
tokenizes the history) to the first streamed token. Each conversation is repeated ``--reps``
times and the table shows per-turn medians.

Target: TTFT of turn 10 ÷ turn 1 ≤ 1.5 with reuse (without reuse it grows with the history).
The script reports; it never fails on a missed target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.backends.base import default_threads

MESSAGES = (
    "Hi! I am planning a trip to Italy next spring. Can you help me?",
    "Which city should I visit first?",
    "What are three sights I should not miss there?",
    "How many days should I stay?",
    "What is a typical local dish I should try?",
    "Is it easy to travel by train to Florence from there?",
    "What should I see in Florence?",
    "Any tips to avoid the crowds?",
    "What should I pack for the weather in April?",
    "Thanks! Can you summarise my plan in two sentences?",
)


@dataclass(frozen=True)
class TurnTiming:
    """What one turn measured."""

    ttft_s: float  # send() call to first streamed event
    backend_ttft_s: float  # generate() start to first token, from GenerationStats
    prompt_tokens: int
    evaluated_tokens: int
    answer: str


def run_turn(session: Any, text: str) -> TurnTiming:
    """Send one message, drain the answer, return its timings."""
    start = time.perf_counter()
    first: float | None = None
    for _event in session.send(text):
        if first is None:
            first = time.perf_counter()
    turn = session.last_turn
    stats = turn.stats
    return TurnTiming(
        ttft_s=(first or time.perf_counter()) - start,
        backend_ttft_s=stats.ttft_s if stats else float("nan"),
        prompt_tokens=stats.prompt_tokens if stats else 0,
        evaluated_tokens=stats.evaluated_tokens if stats else 0,
        answer=turn.text,
    )


def run_conversations(
    models: tuple[Any, Any], params: Any, n_turns: int
) -> tuple[list[TurnTiming], list[TurnTiming], list[int]]:
    """One conversation on each model, alternating turns; returns (reuse, no reuse, differing turns).

    Greedy answers may differ: a cache built token by token holds slightly different numbers
    than one prefilled in a batch, and a near tie between two tokens can flip.
    """
    from edge_runtime.session import Session

    with_reuse, without_reuse = models
    with_reuse.reset()
    without_reuse.reset()
    a, b = Session(with_reuse, params=params), Session(without_reuse, params=params)
    timings_a: list[TurnTiming] = []
    timings_b: list[TurnTiming] = []
    differing: list[int] = []
    for number, text in enumerate(MESSAGES[:n_turns], start=1):
        timings_a.append(run_turn(a, text))
        without_reuse.reset()
        timings_b.append(run_turn(b, text))
        if timings_b[-1].answer != timings_a[-1].answer:
            differing.append(number)
            # Keep both histories identical so both sides answer the same prompt next turn.
            b.messages[-1]["content"] = timings_a[-1].answer
    return timings_a, timings_b, differing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or store name (default: embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="threads (default: physical cores)")
    parser.add_argument("--ctx", type=int, default=2048, help="context size (default 2048)")
    parser.add_argument("--max-tokens", type=int, default=48, help="most tokens per answer (default 48)")
    parser.add_argument("--turns", type=int, default=len(MESSAGES), choices=range(2, len(MESSAGES) + 1),
                        metavar=f"2..{len(MESSAGES)}", help=f"turns (default {len(MESSAGES)})")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the conversation (default 3)")
    args = parser.parse_args()

    from edge_runtime import load
    from edge_runtime.backends.base import SamplingParams, Settings

    settings = Settings(n_ctx=args.ctx, n_threads=args.threads)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    models = (load(args.model, settings), load(args.model, settings))
    load_before = os.getloadavg()[0]

    print("warm-up conversation ...", file=sys.stderr)
    run_conversations(models, params, 2)
    reps: list[tuple[list[TurnTiming], list[TurnTiming], list[int]]] = []
    for rep in range(args.reps):
        print(f"conversation {rep + 1}/{args.reps}", file=sys.stderr)
        reps.append(run_conversations(models, params, args.turns))
    load_after = os.getloadavg()[0]

    def median_ms(side: int, turn: int, field: str) -> float:
        return statistics.median(getattr(r[side][turn], field) for r in reps) * 1000

    first_rep = reps[0]
    name = Path(getattr(models[0], "path", "") or models[0].info.name).name
    print(f"chat TTFT · {name} · {args.threads} threads · "
          f"ctx {args.ctx} · greedy, max {args.max_tokens} tokens per answer · {args.turns} turns")
    print(f"medians of {args.reps} conversations after a warm-up · load average "
          f"{load_before:.2f} before, {load_after:.2f} after")
    print()
    print(f"{'':6}{'prompt':>8}|{'---------- reuse ----------':>28} |{'-------- no reuse --------':>28}")
    print(f"{'turn':<6}{'tokens':>8}|{'evaluated':>10}{'ttft ms':>9}{'backend':>9} |"
          f"{'evaluated':>10}{'ttft ms':>9}{'backend':>9}")
    for t in range(args.turns):
        ta, tb = first_rep[0][t], first_rep[1][t]
        print(f"{t + 1:<6}{ta.prompt_tokens:>8}|{ta.evaluated_tokens:>10}{median_ms(0, t, 'ttft_s'):>9.1f}"
              f"{median_ms(0, t, 'backend_ttft_s'):>9.1f} |{tb.evaluated_tokens:>10}"
              f"{median_ms(1, t, 'ttft_s'):>9.1f}{median_ms(1, t, 'backend_ttft_s'):>9.1f}")
    print()
    last = args.turns - 1
    ratio_reuse = median_ms(0, last, "ttft_s") / median_ms(0, 0, "ttft_s")
    ratio_plain = median_ms(1, last, "ttft_s") / median_ms(1, 0, "ttft_s")
    ratio_backend = median_ms(0, last, "backend_ttft_s") / median_ms(0, 0, "backend_ttft_s")
    verdict = "meets target" if ratio_reuse <= 1.5 else "ABOVE target"
    print(f"turn {args.turns} / turn 1 TTFT, reuse      {ratio_reuse:6.2f}   (target <= 1.5: {verdict})")
    print(f"turn {args.turns} / turn 1 TTFT, no reuse   {ratio_plain:6.2f}")
    print(f"turn {args.turns} / turn 1, backend only    {ratio_backend:6.2f}   (generate() start to first token)")
    print(f"turn {args.turns}: no reuse / reuse          "
          f"{median_ms(1, last, 'ttft_s') / median_ms(0, last, 'ttft_s'):6.2f}")
    differing = sorted({t for r in reps for t in r[2]})
    print(f"greedy answers identical with and without reuse: {args.turns - len(differing)}/{args.turns} "
          f"turns" + (f" (differ: turns {', '.join(map(str, differing))}; the reuse side's answer "
                      "was kept in both histories)" if differing else ""))
    for m in models:
        m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
