_base_ = ["./toy_leaf.py"]
optim = dict(_delete_=True, lr=5e-5)
