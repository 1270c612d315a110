"""Training: LLaVA-1.5's recipe (CLIP on captions for a synthetic world, projector pre-training,
fine-tuning with answer-only loss) on ``transformers``' ``Trainer``, writing packs that
``squint up`` serves unchanged (:mod:`training.run`, the stages; :mod:`training.data`, LLaVA's
conversation JSON with the serving prompt code and the loss mask)."""
