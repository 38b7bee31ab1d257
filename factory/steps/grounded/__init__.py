"""Knowledge-grounded QA: documents -> chunks -> questions -> cited answers -> groundedness.

``chunk`` cuts documents into passages with stable ids (``water-cycle.md#2``).
``grounded_questions`` asks the model for questions that one passage -- or, for multi-hop
questions, two passages of the same document -- can answer. ``grounded_answer`` answers
from those passages, citing their ids in square brackets; an answer without a valid
citation is dropped. ``groundedness`` shows a judge only the passages an answer cites and
drops the answers it finds unsupported. Each step is in the module named after its key;
what they share (how passages are written into a context and read back) is in
:mod:`.context`.

Passages travel between the steps in the ``context`` column, each introduced by its id in
square brackets on a line of its own::

    [water-cycle.md#2] The Water Cycle > Precipitation
    Inside a cloud, droplets collide and merge. ...

so a dataset made elsewhere (a ``context`` in this form and its ``chunk_ids``) can be
answered and judged by these steps too.
"""
