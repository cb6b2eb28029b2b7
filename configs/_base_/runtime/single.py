# One process on the best device present (cuda > mps > cpu).
runner = dict(type="single", device="auto")
log = dict(interval=5, tensorboard=True, plot=True)
seed = 42
