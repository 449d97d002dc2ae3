"""Scheduler names, the one list ``BatchConfig.scheduler``, the scheduler registry and the
command line share (a module of its own so that ``--help`` needs no torch)."""
SCHEDULER_NAMES = ("fifo", "prefill_first")
