"""Compositions of runs: the paper's recipe of pretraining stages (recipe) and the ablation rows, each
a recipe run then evaluated (ablate)."""
