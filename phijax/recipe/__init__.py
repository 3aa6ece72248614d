"""The phi-1 recipe as one resumable command (`python -m phijax.recipe`; phijax/recipe/run.py).

config.py: the gin settings (Recipe, a StageConfig per stage); stages.py: what each stage runs
and leaves in its directory; runner.py: fingerprints, completion markers, child processes and the
served teacher; report.py: report.md, report.json and the plots.
"""
