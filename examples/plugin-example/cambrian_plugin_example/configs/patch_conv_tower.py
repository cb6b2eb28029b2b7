# A base other configs can inherit with _base_ = ["example::patch_conv_tower.py"]
_tower = dict(type="patch_conv", image_size=64, patch_size=8, hidden_size=48)
