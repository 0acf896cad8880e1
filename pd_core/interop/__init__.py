"""Other libraries' models in and out of the pipeline: diffusers teachers (``diffusers``).

``diffusers`` is an optional dependency (``pip install -e .[diffusers]``): it is imported inside the
functions that need it, so everything else in pd_core runs without it.
"""
