"""The click command line of cleftchunk (installed as ``cleftchunk_cli``): a thin layer over the library."""
