"""Child entry point: onnxruntime-genai's model builder, with one fix for Gemma 3 configs.

Run as ``python -m edge_runtime.converters.onnx_builder <the builder's arguments>``.

transformers 5 nests a Gemma 3 config's RoPE per layer type (``rope_parameters = {"full_attention":
{...}, "sliding_attention": {...}}``). The builder's Gemma 3 class (onnxruntime-genai 0.18) reads
the flat transformers 4 fields instead: ``rope_parameters["rope_type"]``, ``rope_theta`` for the
full layers and ``rope_local_base_freq`` for the sliding ones. Without the fix it fails with
``KeyError: 'rope_type'``, and would otherwise use the default base 10000 for the full layers.
Before the builder reads such a config, the flat fields are set from the nested ones, the way the
builder's own Gemma 4 class reads them.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any


def _flatten_gemma3_rope(config: Any) -> None:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "full_attention" not in params:
        return
    full, sliding = dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    config.rope_theta = full.get("rope_theta", 1_000_000.0)
    config.rope_local_base_freq = sliding.get("rope_theta", 10_000.0)
    config.rope_parameters = full


def main() -> None:
    import onnxruntime_genai.models  # noqa: F401 - puts the builder's folder on sys.path, as it expects

    # isort: split
    # The builder imports its classes as the top-level package ``builders``: patch that one (the
    # import above must run first, so sorting may not swap the two).
    import builders  # type: ignore[import-not-found]

    original = builders.Gemma3Model.__init__

    def init(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        _flatten_gemma3_rope(config)
        original(self, config, *args, **kwargs)

    builders.Gemma3Model.__init__ = init
    sys.argv = ["onnxruntime_genai.models.builder", *sys.argv[1:]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
