"""Scoring maps: deletion/insertion, the pointing game, localization, ROAD and map
similarity, each a module of tensors in and numbers out; the comparison maps scored beside a
run's (comparisons) and their cache; a batch's columns (scoring)."""
