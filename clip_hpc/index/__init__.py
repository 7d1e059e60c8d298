"""EMB_DIR -> INDEX_DIR: choosing parameters, training, adding per rank, merging, and the recall self-check."""
