"""The GIST op (GISTEmbedLoss, CachedGISTEmbedLoss): ``spec`` (what it computes, the masks as stock decides them),
``chunked`` (the driver of the torch / native backends), ``triton_backend`` (the Triton backend), ``functional``
(``fused_gist_loss``). The MNRL op (:mod:`st_fast.ops.mnrl`) has the same modules; what both share lives in
:mod:`st_fast.ops`."""
