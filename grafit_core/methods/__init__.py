"""Registry of methods: name -> Method subclass. Adding a method = one module + one entry here."""
from grafit_core.errors import ConfigError
from grafit_core.methods.base import Method
from grafit_core.methods.ce import CEBaseline
from grafit_core.methods.clusterfit import ClusterFitPlus
from grafit_core.methods.grafit import Grafit, GrafitFC
from grafit_core.methods.snca import SNCAPlus

METHODS: dict[str, type[Method]] = {
    "grafit": Grafit,
    "grafit_fc": GrafitFC,
    "snca+": SNCAPlus,
    "ce": CEBaseline,
    "clusterfit+": ClusterFitPlus,
}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]
