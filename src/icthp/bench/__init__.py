"""Preference benchmarks of reward models: ``icthp bench`` (accuracy on triplet and pairwise data, an on-disk
embedding cache, JSON / markdown / HTML reports) and ``icthp metrics`` (JPEG size, aesthetic score)."""
