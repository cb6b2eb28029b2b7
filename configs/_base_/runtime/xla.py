# One XLA device through torch_xla (its own venv: requirements-xla.txt); static-ish shapes for fewer compiles.
runner = dict(type="xla")
log = dict(interval=10, tensorboard=True, plot=True)
seed = 42
