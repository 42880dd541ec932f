"""New vocabulary for a base model: tokens learned from a corpus (:mod:`.extend`) and the
embedding rows they need, initialised from the pieces they replace (:mod:`.resize`)."""
