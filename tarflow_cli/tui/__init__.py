"""The live terminal dashboard (`tarflow watch`, `tarflow train --ui tui`).

`make_app(run_dir, owner=None)` builds the Textual app; `run_training_dashboard(run_dir,
start_training)` runs a training function in a worker thread with the dashboard in front.
Imported lazily by the commands, so the rest of the CLI does not pay for Textual.
"""
