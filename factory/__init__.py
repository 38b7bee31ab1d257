"""The factory: a data-centric synthetic dataset factory for LLM self-evolution.

Recipes (YAML) chain task generators, solvers, judges and filters; each run writes an
immutable, versioned Hugging Face dataset with a manifest and a card.
"""

__version__ = "0.1.0"
