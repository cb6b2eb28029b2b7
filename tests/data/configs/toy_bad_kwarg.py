_base_ = ["./toy_leaf.py"]
model = dict(hiden=32)
