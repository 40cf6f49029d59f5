from .base import Formulation
from .edm import EDMFormulation
from .rectified_flow import RectifiedFlowFormulation, euler_grid, heun_steps, rk45_solve


FORMULATIONS = {formulation.name: formulation for formulation in (EDMFormulation, RectifiedFlowFormulation)}


def formulation_from_name(name: str, scheduler=None, **kwargs) -> Formulation:
    """
    The formulation a pipeline's config names ("edm" or "rectified_flow"), around `scheduler` (its default one when
    `None`); `kwargs` go to its constructor (e.g. `P_mean`, `eps`).
    """
    if name not in FORMULATIONS:
        raise ValueError(f"Unknown formulation {name!r}: choose one of {sorted(FORMULATIONS)}.")
    return FORMULATIONS[name](scheduler, **kwargs)
