# CPU-sized stage 2 for the demo model: connector + LLM (+ the demo's trainable ViT tower).
stage = "finetune"
optim = dict(type="AdamW", lr=1e-4, weight_decay=0.0, lr_groups={"connector.vision_sampler*": 1e-4})
schedule = dict(epochs=2, warmup_ratio=0.05, scheduler="cosine", precision="fp32", clip_grad=1.0)
checkpoint = dict(interval=200, keep_last=1)
