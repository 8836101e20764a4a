"""The on-device acceptance suite: does this device meet its profile?

Run it on the device itself with ``edgert device-test [--model M] [--out DIR]`` (it wraps
``pytest``; extra arguments go to pytest). It is not part of CI. It checks that detection is
sane, that the planned artifact loads, that greedy output matches the manifest's reference
continuation, that decode speed reaches the profile's floor, that memory stays inside the plan's
estimate, and that chat and the server answer; and it writes ``bench.json`` and the report
(``report.html``, ``report.md``, ``report.json``) into the output folder.
"""
