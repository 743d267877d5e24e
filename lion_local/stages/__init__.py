"""The three stages of an iteration and the loop that runs them in order.

loop.py orders the stages; imitation.py (with training_launch.py and sft.py, the training
process), discrimination.py (with judging.py, shared with `evaluate`) and generation.py (with
novelty.py) each own one stage; teacher_answers.py is the run-wide cache of teacher answers
both imitation and discrimination use; iteration_report.py writes each iteration's report.json.
"""
