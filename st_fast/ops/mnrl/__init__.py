"""The MNRL op (MultipleNegativesRankingLoss and its family): ``spec`` (what it computes), ``chunked`` (the driver of
the torch / native backends), ``triton_backend`` (the Triton backend), ``functional`` (``fused_mnrl_loss``). The GIST
op (:mod:`st_fast.ops.gist`) has the same modules; what both share lives in :mod:`st_fast.ops`."""
