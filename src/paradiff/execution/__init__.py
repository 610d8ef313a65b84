"""What every method shares: the step clock, the CUDA-graph runner and the compile policy."""

from paradiff.execution.clock import StepClock, Tick
from paradiff.execution.graphs import GraphRunner
from paradiff.execution.policy import Execution

__all__ = ["Execution", "GraphRunner", "StepClock", "Tick"]
