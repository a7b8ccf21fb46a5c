"""st_fast benchmarks: every fused part against stock sentence-transformers, in the same process."""
