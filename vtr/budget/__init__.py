"""Budget: the analytic cost model of an encoder and the schedule solver (``r=`` / ``keep=`` / ``flops=``)."""
from .cost import EncoderCost
from .schedule import RSpec, Schedule, make_schedule, reduced_macs

__all__ = ["EncoderCost", "RSpec", "Schedule", "make_schedule", "reduced_macs"]
