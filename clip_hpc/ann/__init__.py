"""The shared approximate-nearest-neighbour layer below `index/` (which builds) and `search/` (which serves): the pure
search core, exact ground truth with tie-aware recall, text-like query generation and the re-rank tier's query side.
It imports neither wing, so both can use it without leaning on each other."""
