"""diffusers pipelines extended by studio (adapters per call, per-prompt membranes, one-step, control).

Generation today uses diffusers' own pipelines through `studio.load_pipeline`; the extended
pipelines land here with the methods that need them.
"""
