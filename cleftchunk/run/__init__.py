"""Running block-wise work: the one executor (:mod:`.executor`) and its layouts (:mod:`.layout`),
completion records (:mod:`.records`), progress (:mod:`.progress`), where it runs (:mod:`.local`:
threads of this process, :mod:`.cluster`: Dask clusters), and chunk-aligned tasks that fill Zarr
arrays (:mod:`.chunks`, used by convert and pyramid levels)."""
