"""Executors: where a recipe's work runs. Siblings under one base, chosen by the driver's caller.

``local`` runs every batch in this process; ``ray`` spreads batches, groups and LLM
replicas over a Ray cluster. Both run a batch through :func:`base.run_batch`, so the
outputs, caches and seeds are the same wherever the work ran.
"""
