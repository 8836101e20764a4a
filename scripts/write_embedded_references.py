"""Write the reference continuations shipped for the embedded models (edge_runtime/models/references/).

Each installed embedded model's greedy continuations of the fixed reference prompts, written by
the one writer of references (``backends.llamacpp.greedy_reference``, which ``edgert convert``
uses for a manifest too). The on-device suite checks a device against them, and
``tests/test_device_suite.py`` fails when a shipped file no longer matches what this machine
writes: rerun this script then (after a llama-cpp-python upgrade, say) and commit the result.

Usage: .venv/bin/python scripts/write_embedded_references.py [--model NAME]... [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path


def write_references(names: list[str], out: Path, threads: int | None) -> list[Path]:
    """Write ``<name>.json`` into ``out`` for each embedded model named (all installed ones when none)."""
    from edge_runtime.backends.llamacpp import greedy_reference
    from edge_runtime.files import atomic_write, file_sha256
    from edge_runtime.models.embedded import EMBEDDED, embedded_model_path, find_embedded

    unknown = [n for n in names if find_embedded(n) is None]
    if unknown:
        known = ", ".join(m.name for m in EMBEDDED)
        raise SystemExit(f"error: unknown embedded model(s) {', '.join(unknown)} (known: {known})")
    written = []
    for model in [m for m in EMBEDDED if not names or m.name in names]:
        path = embedded_model_path(model)
        if path is None:
            print(f"skipped {model.name}: pip install {model.package.replace('_', '-')} first", file=sys.stderr)
            continue
        reference = greedy_reference(path, file_sha256(path), threads=threads)
        text = json.dumps(reference, indent=1, ensure_ascii=False) + "\n"
        # Token lists on one line each: a file a person can read and a diff that shows what moved.
        text = re.sub(r"\[\n\s+(\d+(?:,\n\s+\d+)*)\n\s+\]", lambda m: "[" + re.sub(r",\n\s+", ", ", m[1]) + "]", text)
        written.append(atomic_write(out / f"{model.name}.json", text))
        print(f"wrote {written[-1]}", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    from edge_runtime.models.embedded import REFERENCES_FOLDER

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="an embedded model name (default: every one)")
    parser.add_argument("--out", type=Path, default=REFERENCES_FOLDER,
                        help="folder to write into (default: the package's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp threads (the output does not depend on them)")
    args = parser.parse_args(argv)
    write_references(args.model, args.out, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
