"""The run model: what a run holds on disk and the rules that keep it resumable.

layout.py names every path of the run directory and the typed stage marker; state.py keeps
state.json, the append-only journals and the writer lock; records.py builds instruction records
and the Train and Cache Pools; record_types.py types every journal line and summary;
identity.py remembers the settings that shaped the run; log.py copies a command's log into
the run. Nothing here imports a stage, a role or an endpoint.
"""
