_lr = 1e-3
optim = dict(lr=_lr, weight_decay=0.0, lr_groups=dict(projector=1e-3, sva=1e-4))
schedule = dict(epochs=1, warmup_ratio=0.03, grad_accum=1)
