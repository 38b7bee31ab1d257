"""``factory view``: a local web page over an output folder's versions, drops and evolve runs,
where people's verdicts on rows measure the judges (see server.py)."""
