from .scheduling_ipndm import IPNDMScheduler, IPNDMSchedulerOutput, ScheduleNotSetError
from .solvers import SOLVERS, solver_from_config
