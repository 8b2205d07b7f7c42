"""One module per stage of the pipeline, each a Config dataclass and run(config); `cli` is the command line.

Installed as `dho_pipeline.stages` (pyproject.toml maps this folder there), so nothing named `stages`
lands in a user's environment.
"""
