"""Stream processing room: the event contract, the Faust app, grouping, CTR, pairs, drift."""
