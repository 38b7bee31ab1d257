"""Curation filters: each step keeps a row or drops it with a reason.

Filters are recipe steps named after their module (``- score: {min: 7}``). Counts per
reason go into the manifest and dropped rows into the version's ``rejected/`` table.
"""
