"""The prepared GPU run: speed figures of the paper's U-Net, then the fmnist-gpu pipeline, in one bounded command.

Modules: ``fit`` (measure the update and forward rates, fit the update counts to the time budget),
``quality`` (the pipeline through pd_core's jobs and evaluation), ``report`` (target checks, the
results files' rows and Markdown), ``run`` (the command), ``merge`` (copy a finished run's results
into the repository). See benchmarks/gpu/README.md for the preparation and the command line.
"""
