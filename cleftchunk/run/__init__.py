"""Running block-wise work: chunk-aligned tasks and their runner (:mod:`.chunks`), Dask clusters
(:mod:`.cluster`)."""
