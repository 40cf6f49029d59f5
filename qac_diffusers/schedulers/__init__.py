from .scheduling_ipndm import IPNDMScheduler, IPNDMSchedulerOutput
from .solvers import SOLVERS, solver_from_config
