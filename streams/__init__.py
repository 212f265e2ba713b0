"""Stream processing room: the Faust worker, grouping, CTR, pairs, drift; pushes features to Feast."""
