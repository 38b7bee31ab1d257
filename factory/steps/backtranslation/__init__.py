"""Instruction backtranslation (Humpback; Li et al., 2023): instructions for unlabeled text.

``backtranslate`` (self-augmentation): each document -- or each segment of one, so that a
small model is not handed thousands of tokens -- is taken as the answer an assistant gave,
and the model writes the instruction it answers. The text becomes ``response``, the
generated instruction ``instruction``.

``self_curate`` (self-curation): the model rates each (instruction, response) pair on a
5-point rubric, reasoning first, and only pairs at or above ``min_score`` are kept.

Humpback iterates by fine-tuning on the curated pairs and augmenting again. Here a later
``backtranslate`` pass can also show curated pairs from an earlier version as few-shot
demonstrations (``examples_from``), which is what turns a weak zero-shot prompt into a
usable one for a small model.

Modules: one per step (:mod:`.backtranslate`, :mod:`.self_curate`), and their helpers:
:mod:`.segments` (documents cut on paragraph boundaries), :mod:`.instructions` (an
instruction out of a backward-model reply), :mod:`.examples` (the demonstrations).
"""
