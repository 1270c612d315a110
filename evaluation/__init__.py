"""Answer quality against visual tokens: the shapes world, datasets, scoring and ``squint eval``.

``squint data world`` (:mod:`evaluation.world`) writes a seeded visual-question world in which
compression visibly matters; :mod:`evaluation.datasets` reads it and the layouts users already
have (Squint's evaluation JSONL, lmms-eval's POPE, GQA, TextVQA and ScienceQA-IMG parquet) into
:class:`evaluation.questions.Question` records; :mod:`evaluation.scoring` scores answers the way
lmms-eval does for each task type; ``squint eval`` (:mod:`evaluation.run`) runs a dataset through
the real stack for a grid of compressors and budgets beside the Hugging Face baseline.
"""
