"""Scheduler and admission names, the lists ``BatchConfig``, the scheduler registry and the
command line share (a module of its own so that ``--help`` needs no torch)."""
SCHEDULER_NAMES = ("fifo", "prefill_first")
ADMISSIONS = ("predictive", "greedy")  # how waiting requests are admitted (docs/scheduling.md)
