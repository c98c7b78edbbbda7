"""Ray, MLflow and the `grafit` CLI: the only package that knows them. Imports grafit_core, never the reverse."""
