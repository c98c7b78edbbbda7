"""The cross-entropy baseline (paper §4.2): kNN and retrieval on l2-normalised trunk features;
its softmax head gives p_c for conditioned ranking."""
from grafit_core.methods.base import Method


class CEBaseline(Method):
    defaults = {"w_knn": 0.0, "w_inst": 0.0, "w_ce": 1.0, "projector": "none"}
    head_gives_coarse = True
