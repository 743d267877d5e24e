"""The commands beside the loop (lion_local.stages.loop runs run, iteration, stage and status).

plan, report, compare and export read a run without changing it; evaluate journals its own
results under eval/ and never changes the run's stages; doctor and serve start servers.
Each computes what it shows from the stages' and the run model's own functions, so a rule
changed in a stage changes what these commands say.
"""
