"""Reading inputs and embedding them: listing, tars, image decoding, the per-rank embedding loop."""
