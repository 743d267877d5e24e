"""The commands that read a run without changing it: plan, report, evaluate and doctor.

Each computes what it shows from the stages' and the run model's own functions, so a rule
changed in a stage changes what these commands say.
"""
