"""The process around the app: the command line (``cli``), one serving
process with its signals, drain and stop (``serve``), the listening socket
and its limits (``edge``), the workers' supervisor (``workers``), CPU
counting (``cpus``) and the configuration's reload (``reload``).

The top layer but for ``python -m gateway``: it may import anything below
it, and nothing below imports it.
"""
