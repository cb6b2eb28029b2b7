seed = 42
work_dir = "work_dirs/toy"
log = dict(interval=10, tensorboard=True)
