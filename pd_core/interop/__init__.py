"""Other libraries' models in and out of the pipeline: diffusers teachers (``diffusers``), Stable Diffusion-style
text-to-image pipelines (``sd_folder``, ``sd_unet``, ``sd_pipeline``,
``sd_sampling``, ``sd_latents``).

``diffusers`` and ``transformers`` are optional dependencies (``pip install -e .[diffusers]``): they are
imported inside the functions that need them, so everything else in pd_core runs without them.
"""
