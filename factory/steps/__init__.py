"""Recipe steps, one module per recipe key (a family may share a package).

The base classes are in :mod:`factory.steps.base` (the LLM step's in
:mod:`factory.steps.llm_step`, the filters' in :mod:`filters.base`); which key is which class
is :mod:`factory.registry`'s business.
"""
