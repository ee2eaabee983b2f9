"""What the stage kinds share: the stage contract, the steps every kind's `run` reads as (recipe.py: load → adapt →
fit → save), the Trainer set-up, checkpoints, templates, packing, losses, generation, rewards, metrics, progress lines,
the memory estimate and benchmarks. Nothing here imports a kind (stages/<kind>.py); the kinds import from here."""
