"""Grafit (MLP projector) and Grafit FC (linear projector): L_knn + L_inst (paper eq. 4)."""
from grafit_core.methods.base import Method


class Grafit(Method):
    defaults = {"w_knn": 1.0, "w_inst": 1.0, "w_ce": 0.0, "projector": "mlp"}


class GrafitFC(Method):
    defaults = {"w_knn": 1.0, "w_inst": 1.0, "w_ce": 0.0, "projector": "linear"}
