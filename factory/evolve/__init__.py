"""``factory evolve``: the self-evolution loop (:mod:`.loop`) and its recipe section (:mod:`.config`)."""
