"""What this machine is: CPU and SIMD, memory, GPUs, board, thermal state, and which backends run.

``detect()`` reads it all (never raising for something it cannot read) into a ``DeviceInfo``.
"""

from __future__ import annotations

from edge_runtime.device.info import DeviceInfo, detect

__all__ = ["DeviceInfo", "detect"]
