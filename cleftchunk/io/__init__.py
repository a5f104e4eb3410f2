"""Volumes on disk: open and create OME-Zarr images, read other formats, convert, build pyramids.

:mod:`.volumes` (the :class:`Volume` type, ``open_volume`` / ``create_volume``), :mod:`.ome`
(OME-Zarr metadata), :mod:`.sources` (TIFF stacks, image folders, N5, .npy), :mod:`.cremi`
(the CREMI file layout), :mod:`.convert`, :mod:`.pyramid`, :mod:`.info`.
"""
