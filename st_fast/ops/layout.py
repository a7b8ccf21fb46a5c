"""Score-segment layout shared by every backend of the fused contrastive op.

Notation (sentence-transformers 6.2, MultipleNegativesRankingLoss): B local rows, W = B·world columns per candidate
block, k candidate columns (positive + hard negatives), row i of this rank has global index g = offset + i.

A row's logits are the concatenation of the segments of the selected directions; each segment is the raw similarity
of one row vector (the query q_g or the positive document d_g) to one column matrix:

=========  ==========  ==============  ================  =====================================================
direction  row vector  columns         kernel kind       rule for column c of the segment
=========  ==========  ==============  ================  =====================================================
Q2D        q_g         docs (k·W)      OWN_POSITIVE      positive at c == g; hardness penalty on the entries
                                                         given below
Q2Q        q_g         queries (W)     OWN_MASKED        c == g masked to -inf (the query itself)
D2Q        d_g         queries (W)     PLAIN             nothing masked
D2D        d_g         docs (k·W)      OWN_GROUP_MASKED  c % W == g masked to -inf (the document itself and its
                                                         own negatives)
=========  ==========  ==============  ================  =====================================================

The row kernels know segments only by their kind (:class:`st_fast._native.SegmentKind`), the rule for the row's own
column(s) g; Q2D .. D2D are MNRL's directions (query_to_doc, query_to_query, doc_to_query, doc_to_doc) and name them
where the symmetric path needs the direction. Other ops pick kinds by rule (GIST: OWN_POSITIVE for [AP | AN..],
OWN_MASKED or PLAIN for its AA / PP blocks, :mod:`st_fast.ops.gist.spec`). A PLAIN segment holds the positive at
column g under per-direction partitions (MNRL's doc_to_query LSE), never in a joint one.

Hardness (Q2D only, strength α > 0): logit = scale·s + α·stopgrad(s) on the penalized entries:
IN_BATCH penalizes c % W != g (other rows' positives and negatives), HARD penalizes c % W == g with c >= W (the
row's own hard negatives), ALL penalizes c != g. The positive entry c == g is never penalized.

Duplicate masking (``mask_duplicates``, opt-in; not in stock): with per-text labels (equal iff the texts' token ids
are equal; query labels for the queries' columns, doc labels for the docs'), column c of a segment is also masked
for row g when label[c] == label[g] and c != g, label being the segment's column labels: the column's text equals
the row's reference text (Q2D / D2D: the positive d_g, column g of docs; Q2Q / D2Q: the anchor q_g, column g of
queries). The target c == g is never masked by it. On the symmetric path (doc_to_query from the Q2D tile's columns,
:mod:`st_fast.ops.mnrl.chunked`) an entry (r, c) of the positive block is masked in Q2D by the doc labels and, as
D2Q row c / column r, by the query labels, each term on its own.
"""

from __future__ import annotations

# The codes are shared with the compiled row kernels: defined once in st_fast._native, which checks them against the
# extensions' boundary_codes at import.
from st_fast._native import HardnessKind, SegmentKind

DIRECTION_TO_KIND = {
    "query_to_doc": SegmentKind.OWN_POSITIVE,
    "query_to_query": SegmentKind.OWN_MASKED,
    "doc_to_query": SegmentKind.PLAIN,
    "doc_to_doc": SegmentKind.OWN_GROUP_MASKED,
}

HARDNESS_TO_KIND = {
    None: HardnessKind.NONE,
    "in_batch_negatives": HardnessKind.IN_BATCH,
    "hard_negatives": HardnessKind.HARD,
    "all_negatives": HardnessKind.ALL,
}

# Which operand ("queries" or "docs") gives each kind its row vectors and its columns.
ROW_SOURCE = {
    SegmentKind.OWN_POSITIVE: "queries",
    SegmentKind.OWN_MASKED: "queries",
    SegmentKind.PLAIN: "docs",
    SegmentKind.OWN_GROUP_MASKED: "docs",
}
COLUMN_SOURCE = {
    SegmentKind.OWN_POSITIVE: "docs",
    SegmentKind.OWN_MASKED: "queries",
    SegmentKind.PLAIN: "queries",
    SegmentKind.OWN_GROUP_MASKED: "docs",
}
