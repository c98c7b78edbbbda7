"""SNCA+ (paper §4.2): the kNN loss alone with an MLP projector and Grafit's optimisation."""
from grafit_core.methods.base import Method


class SNCAPlus(Method):
    defaults = {"w_knn": 1.0, "w_inst": 0.0, "w_ce": 0.0, "projector": "mlp"}
