"""Benchmarks of Squint against the Hugging Face baseline, measured side by side in one run.

``squint bench`` (:mod:`bench.suite`, the command) measures, on one model pack (:mod:`bench.run`,
the run in order): the in-process ``LlavaForConditionalGeneration`` baseline
(:mod:`bench.baseline`) and the real stack with every built-in compressor, cold and with a warm
cache, then a multi-image and a video request under a budget (:mod:`bench.stack_runs`); the
vision worker's throughput with and without micro-batching (:mod:`bench.throughput`). Beside
them: what is measured (:mod:`bench.settings`), the pictures and videos sent
(:mod:`bench.media`), the KV-cache arithmetic (:mod:`bench.kv`), and what is read from /proc and
Prometheus while requests run (:mod:`bench.probes`). :mod:`bench.results` aggregates and writes
what was measured (table, JSON), :mod:`bench.plot` draws the PNG. Nothing here gates CI on time:
ratios are measured in the same run and reported, never asserted.

The standalone scripts beside it (``llm_concurrency.py``, ``make_perf_input_data.py``) run
as ``.venv/bin/python bench/<script>.py``.
"""
