"""Prefect deployments of the pipeline: `python -m deployments.deploy --help`."""
