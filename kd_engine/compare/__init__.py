"""python -m kd_engine.compare: a grid of methods x options x seeds, trained, evaluated and reported with paired
bootstrap intervals (spec.py: the spec; run.py: cells; evaluate.py: evaluators; stats.py; report.py)."""
