"""diffusers pipelines extended by studio: `membranes` (each SPM membrane at its per-prompt permeability,
inside the pipeline's own call). Plain generation uses diffusers' pipelines through `studio.load_pipeline`.
"""
