"""Classroom exercises: starters with holes cut from the engine's real code, and their checks.

    python -m tinymoe.exercises list [--json]
    python -m tinymoe.exercises start ID [--workdir DIR] [--force]
    python -m tinymoe.exercises check ID [--workdir DIR] [--solution]

docs/exercises/README.md is the teachers' index; holes.py says how a starter is made, answers.py
what counts as the student's own answer, runner.py how a check is run and reported.
"""
