"""The on-device acceptance suite: does this device meet its profile?

Run it on the device itself with ``edgert device-test [--model M] [--out DIR]`` (it wraps
``pytest``; extra arguments go to pytest). It is not part of CI. It checks that detection is
sane, that the planned artifact loads, that greedy output matches the reference continuations
(a convert output's manifest, or the ones shipped for the embedded models), that decode speed
reaches the floor of the profile's device class for that artifact (``planning/floor.py``), that
memory stays inside the plan's estimate, and that chat and the server answer. It writes
``verdict.md`` (what was checked, what passed, what failed with the measured and expected
figures, what could not be checked here and why; also printed at the end), ``bench.json`` and the
report (``report.html``, ``report.md``, ``report.json``) into the output folder.
"""
