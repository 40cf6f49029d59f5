from .scheduling_ipndm import IPNDMScheduler, IPNDMSchedulerOutput


__all__ = ["IPNDMScheduler", "IPNDMSchedulerOutput"]
