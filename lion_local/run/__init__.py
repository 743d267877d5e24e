"""The run model: what a run holds on disk and the rules that keep it resumable.

layout.py names every path of the run directory and the typed stage marker; state.py keeps
state.json, the append-only journals and the writer lock; records.py builds instruction records
and the Train and Cache Pools; teacher_cache.py is the run-wide cache of teacher answers;
journaled_calls.py makes model calls that are journaled as they return; identity.py remembers
the settings that shaped the run.
"""
