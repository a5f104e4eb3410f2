"""After prediction: cleft instances (:mod:`.segment`), the CREMI metrics (:mod:`.metrics`) and
the CREMI submission file (:mod:`.export`), all block-wise."""
