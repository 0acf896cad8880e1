"""A checkpoint's N-step sampler as files other tools run: a diffusers folder, or one ONNX graph.

``sampler_grid`` (the log-SNR grid and what the network sees at each step) is what both formats
bake in; ``to_diffusers`` writes a folder ``UNet2DModel.from_pretrained`` loads (students of
diffusers teachers); ``to_sd_pipeline`` writes a complete ``StableDiffusionPipeline`` folder of a
text-to-image student; ``to_onnx`` unrolls the whole sampler, noise in, image out (any student).
"""
