"""Benchmarks of Squint against the Hugging Face baseline, measured side by side in one run.

``squint bench`` (:mod:`bench.suite`) measures, on one model pack: the in-process
``LlavaForConditionalGeneration`` baseline and the real stack with every built-in compressor,
cold and with a warm cache; the vision worker's throughput with and without micro-batching;
and a multi-image and a video request under a budget. :mod:`bench.results` aggregates and
writes what it measured (table, JSON), :mod:`bench.plot` draws the PNG. Nothing here gates CI
on time: ratios are measured in the same run and reported, never asserted.

The standalone scripts beside it (``llm_concurrency.py``, ``make_perf_input_data.py``) run
as ``.venv/bin/python bench/<script>.py``.
"""
